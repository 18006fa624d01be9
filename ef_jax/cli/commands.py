"""The `ef-jax` command line: generate | info | trace | sim | plot-timeline | bench | eval-policy | record |
train-hybrid | serve | convert | train-predictor | eval-predictor.

Each subcommand is a thin shell over the Python API. Inputs and output paths are checked before any model work
(ef_jax.cli.guards); a refusal prints one line naming the flag and the fix and exits 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import signal
import sys
from ef_jax.cli.convert import add_load_args, load_kwargs


class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" after an option's help unless the default is None/False or the help already says it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h or d is None or d is False or d == argparse.SUPPRESS or not action.option_strings:
            return h
        return f"{h} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the project's error habit: one line, naming the command, exit status 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_info(args) -> int:
    """Everything from config.json and the safetensors headers: no weight is read, and (for float experts) neither
    jax nor transformers is imported (a second, not a minute, on a large checkpoint)."""
    import math
    import os

    from ef_jax.checkpoint import expected_shapes, header_summary, host_expert_dtype, non_expert_nbytes
    from ef_jax.cache.config import OffloadConfig
    from ef_jax.cli.guards import UsageError
    from ef_jax.cli.model import Preflight, checkpoint_dir, expert_nbytes, fmt_bytes
    from ef_jax.config import SUPPORTED, from_hf_config, load_hf_config
    from ef_jax.generation_config import read_generation_json
    path = checkpoint_dir("DIR", args.model)
    cfg = from_hf_config(load_hf_config(path), read_generation_json(path))
    dtype = args.dtype or _default_dtype()
    kw = load_kwargs(args)
    if kw["expert_dtype"] is None and kw["group_size"] is None and not os.path.isfile(
            os.path.join(path, "ef_jax_store.json")):
        host = host_expert_dtype(path, cfg, dtype)
        per_expert, expert_dtype = cfg.expert_params() * host.itemsize, host.name
    else:  # quantized sizes (this imports jax)
        per_expert, expert_dtype = expert_nbytes(args, Preflight(path, cfg, None, None), dtype)
    L, E, K = cfg.num_moe_layers, cfg.num_experts, cfg.top_k
    other_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
    expert_params = L * E * cfg.expert_params()
    experts_bytes, other_bytes = L * E * per_expert, non_expert_nbytes(cfg, dtype)
    disk = header_summary(path, cfg)
    print(f"model        {path}")
    print(f"architecture {SUPPORTED[cfg.family]} ({cfg.family})")
    print(f"layers       {cfg.num_layers} ({L} MoE: {list(cfg.moe_layer_ids)})")
    print(f"attention    {cfg.attention}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, head dim {cfg.head_dim}")
    print(f"experts      {E} per MoE layer, top-{K}, D={cfg.hidden_size}, F={cfg.moe_intermediate}"
          + (f", shared expert F={cfg.shared_intermediate}" if cfg.shared_intermediate else ""))
    print(f"context      {cfg.max_position_embeddings or 'not stated'} positions (max_position_embeddings)")
    print(f"parameters   {expert_params + other_params:,} total = {expert_params:,} in routed experts + "
          f"{other_params:,} other")
    if disk:
        print(f"on disk      {fmt_bytes(disk['disk_bytes'])} in {disk['files']} file(s): experts "
              f"{fmt_bytes(disk['expert_bytes_on_disk'])} ({'/'.join(disk['expert_dtypes']) or '-'}), other "
              f"{fmt_bytes(disk['other_bytes_on_disk'])} ({'/'.join(disk['other_dtypes'])})")
    print(f"bytes        experts {fmt_bytes(experts_bytes)} at {expert_dtype} (per expert {fmt_bytes(per_expert)}), "
          f"other {fmt_bytes(other_bytes)} at {dtype}")
    print(f"host memory  pinned: {fmt_bytes(experts_bytes)} of experts (OffloadConfig(host_memory='pinned')); "
          f"mapped: 0 pinned, {fmt_bytes(experts_bytes)} read from the files on demand")
    if args.expert_memory is not None:
        try:
            slots = OffloadConfig(expert_memory=args.expert_memory).resolve_slots(L, E, K, per_expert)
        except ValueError as e:
            raise UsageError(f"--expert-memory {args.expert_memory}: {e}") from None
        print(f"budget       --expert-memory {args.expert_memory} = {slots} slot(s) per MoE layer of {E} "
              f"({slots * L * per_expert:,} bytes on the device, {100 * slots / E:.0f} % of the experts)")
    else:
        print(f"budget       one slot in every MoE layer = {fmt_bytes(L * per_expert)} on the device; "
              f"the minimum (top-{K}) = {fmt_bytes(K * L * per_expert)}")
    print(f"device       weights other than experts {fmt_bytes(other_bytes)} + the expert budget + KV cache")
    tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                      "tokenizer.model", "vocab.json"))
    print(f"tokenizer    {'yes' if tokenizer else 'none'}")
    return 0


def _default_dtype() -> str:
    """ef_jax.model.default_dtype without importing jax: bfloat16 where an accelerator is visible, else float32."""
    import os
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "float32" if platforms.split(",")[0] == "cpu" else "bfloat16"
    return "bfloat16" if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/accel0") else "float32"


def _cmd_trace(args) -> int:
    import ef_jax
    from ef_jax.cli.guards import UsageError, output_file, positive, read_text
    from ef_jax.cli.model import checkpoint_dir
    from ef_jax.engine.loop.batch import normalize_prompts
    from ef_jax.engine.loop.api import save_routing_trace
    from ef_jax.model import has_tokenizer_files
    positive("--max-tokens", args.max_tokens)
    path = checkpoint_dir("--model", args.model)
    if not has_tokenizer_files(path):
        raise UsageError(f"--model {path} has no tokenizer files: trace tokenizes --text, so give a checkpoint "
                         "with tokenizer.json")
    text = read_text("--text", args.text)
    texts = [t for t in (text.split("\n\n") if args.split_paragraphs else [text]) if t.strip()]
    if not texts:
        raise UsageError(f"--text {args.text} holds no text")
    out = output_file("--out", args.out, ".npz")  # numpy's savez appends .npz: report the real name
    model = ef_jax.load(path, dtype=args.dtype, **load_kwargs(args))
    ids, _ = normalize_prompts(texts, model.tokenizer, model.config.vocab_size)
    chunks = [seq[i:i + args.max_tokens] for seq in ids for i in range(0, len(seq), args.max_tokens)]
    experts = save_routing_trace(model, chunks, out)
    print(f"wrote {out}: {experts.shape[0]} tokens × {experts.shape[1]} MoE layers × top-{experts.shape[2]} "
          f"in {len(chunks)} sequences")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import ef_jax
    from ef_jax.cli import generate as cli_generate
    ap = Parser(prog="ef-jax", description="Run MoE LLMs with offloaded experts (ExpertFlow).")
    ap.add_argument("--version", action="version", version=f"ef-jax {ef_jax.__version__}")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="compile every program again instead of reusing ~/.cache/ef_jax/jit ($EF_JAX_CACHE_DIR/jit); "
                         "accepted before or after the command")
    ap.add_argument("--quiet", action="store_true",
                    help="no progress bars (they show only when stderr is a terminal); accepted before or after the "
                         "command")
    sub = ap.add_subparsers(dest="command", required=True)
    cli_generate.add_parser(sub)

    i = sub.add_parser("info", help="architecture, parameter counts and bytes of a checkpoint")
    i.add_argument("model", nargs="?", default=None, metavar="DIR", help="checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    i.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="dtype the bytes are counted at")
    i.add_argument("--expert-memory", default=None, metavar="BYTES",
                   help="a device budget for experts (e.g. 1GiB): prints the slots per MoE layer it buys")
    add_load_args(i, decodes=False)
    i.set_defaults(fn=_cmd_info)

    t = sub.add_parser("trace", help="record per-token routing of a text to an .npz trace")
    t.add_argument("--model", default=None, metavar="DIR", help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    t.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to trace (- reads stdin)")
    t.add_argument("--out", required=True, metavar="TRACE.npz", help="output trace (.npz is appended if missing)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype")
    add_load_args(t)
    t.add_argument("--max-tokens", type=int, default=512, help="tokens per traced sequence")
    t.add_argument("--split-paragraphs", action="store_true", help="one sequence per blank-line-separated block")
    t.set_defaults(fn=_cmd_trace)

    from ef_jax.cli import sim as sim_cli
    sim_cli.add_parser(sub)
    from ef_jax.cli import plot as plot_cli
    plot_cli.add_parser(sub)
    from ef_jax.cli import bench as bench_cli
    bench_cli.add_parser(sub)
    from ef_jax.cli import eval_policy as evalpolicy_cli
    evalpolicy_cli.add_parser(sub)
    from ef_jax.cli import hybrid as hybrid_cli
    hybrid_cli.add_parser(sub)
    try:
        from ef_jax.cli import serve as serve_cli
        serve_cli.add_parser(sub)
    except ImportError:  # the server needs the `serve` extra (fastapi, uvicorn) only when it runs
        pass
    try:
        from ef_jax.cli import convert as quant_cli
        quant_cli.add_parser(sub)
    except ImportError:  # the quantization package is optional at this layer
        pass
    try:
        from ef_jax.cli import predict as predict_cli
        predict_cli.add_parser(sub)
    except ImportError:  # the predictor needs flax/optax
        pass
    return ap


def main(argv=None) -> int:
    from ef_jax import compile_cache, interrupt, progress
    argv, no_cache = compile_cache.pop_flag(list(sys.argv[1:] if argv is None else argv))
    argv, quiet = progress.pop_flag(argv)
    progress.set_quiet(quiet)  # progress bars: a terminal only, and never with --quiet
    original = interrupt.exit_on_sigint("ef-jax generate: interrupted after 0 tokens") if "generate" in argv else None
    try:  # generate: Ctrl-C while jax imports or compiles exits 130 at once (ef_jax.interrupt), never a crash
        args = build_parser().parse_args(argv)
        if args.command != "generate" and original is not None:
            signal.signal(signal.SIGINT, original)
            original = None
        if not no_cache:
            compile_cache.enable()  # a second run loads its programs instead of compiling them
        return _run(args)
    finally:
        if original is not None:  # an in-process caller (tests) gets its own handler back
            signal.signal(signal.SIGINT, original)


def _run(args) -> int:
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # a command without its own handler: no traceback for Ctrl-C
        print(f"ef-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError) as e:  # ImportError: a missing extra
        # OSError: FileNotFoundError / PermissionError / ... on paths the guards could not foresee
        print(f"ef-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
