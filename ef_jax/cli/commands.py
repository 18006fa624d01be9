"""The `ef-jax` command line: generate | info | trace | sim | eval-policy | record | train-hybrid | train-predictor
| eval-predictor.

Each subcommand is a thin shell over the Python API. Inputs and output paths are checked before any model work
(ef_jax.cli.guards); a refusal prints one line naming the flag and the fix and exits 2; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
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
    import ef_jax
    from ef_jax.cli.model import checkpoint_dir, fmt_bytes
    from ef_jax.config import SUPPORTED
    model = ef_jax.load(checkpoint_dir("DIR", args.model), dtype=args.dtype, **load_kwargs(args))
    cfg = model.config
    b, c = model.param_bytes(), model.param_counts()
    print(f"model        {model.path}")
    print(f"architecture {SUPPORTED[cfg.family]} ({cfg.family})")
    print(f"layers       {cfg.num_layers} ({cfg.num_moe_layers} MoE: {list(cfg.moe_layer_ids)})")
    print(f"attention    {cfg.attention}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, head dim {cfg.head_dim}")
    print(f"experts      {cfg.num_experts} per MoE layer, top-{cfg.top_k}, D={cfg.hidden_size}, F={cfg.moe_intermediate}"
          + (f", shared expert F={cfg.shared_intermediate}" if cfg.shared_intermediate else ""))
    print(f"context      {cfg.max_position_embeddings or 'not stated'} positions (max_position_embeddings)")
    print(f"parameters   {c['total']:,} total = {c['experts']:,} in routed experts + {c['other']:,} other")
    print(f"bytes ({model.dtype}) experts {fmt_bytes(b['experts'])}, other {fmt_bytes(b['other'])}, "
          f"per expert {fmt_bytes(b['per_expert'])}")
    print(f"tokenizer    {'yes' if model.tokenizer is not None else 'none'}")
    return 0


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
    sub = ap.add_subparsers(dest="command", required=True)
    cli_generate.add_parser(sub)

    i = sub.add_parser("info", help="architecture, parameter counts and bytes of a checkpoint")
    i.add_argument("model", nargs="?", default=None, metavar="DIR", help="checkpoint (default: the shipped model)")
    i.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="dtype the bytes are counted at")
    add_load_args(i)
    i.set_defaults(fn=_cmd_info)

    t = sub.add_parser("trace", help="record per-token routing of a text to an .npz trace")
    t.add_argument("--model", default=None, metavar="DIR", help="HF checkpoint directory (default: the shipped model)")
    t.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to trace (- reads stdin)")
    t.add_argument("--out", required=True, metavar="TRACE.npz", help="output trace (.npz is appended if missing)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype")
    add_load_args(t)
    t.add_argument("--max-tokens", type=int, default=512, help="tokens per traced sequence")
    t.add_argument("--split-paragraphs", action="store_true", help="one sequence per blank-line-separated block")
    t.set_defaults(fn=_cmd_trace)

    from ef_jax.cli import sim as sim_cli
    sim_cli.add_parser(sub)
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
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # a command without its own handler: no traceback for Ctrl-C
        print(f"ef-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        # OSError: FileNotFoundError / PermissionError / ... on paths the guards could not foresee
        print(f"ef-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
