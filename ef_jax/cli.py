"""The `ef-jax` command line: generate | info | trace | sim.

Each subcommand is a thin shell over the Python API; errors in user input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _cmd_generate(args) -> int:
    import ef_jax
    model = ef_jax.load(args.model, dtype=args.dtype)
    offload = None
    if args.expert_memory or args.slots_per_layer or args.policy or args.timeline:
        from ef_jax.offload.config import OffloadConfig
        offload = OffloadConfig(expert_memory=args.expert_memory, slots_per_layer=args.slots_per_layer,
                                policy=args.policy or "lru", record_timeline=args.timeline)
    res = ef_jax.generate(model, [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, offload=offload)
    s = res.stats
    tok = model.tokenizer
    if tok is not None:  # decode prompt + continuation together so word boundaries come out right
        prompt_ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
        print(tok.decode(list(prompt_ids) + res.tokens[0], skip_special_tokens=True))
    line = (f"[{s['generated_tokens']} tokens | prefill {s['prefill_s'] * 1e3:.1f} ms for {s['prompt_tokens']} "
            f"prompt tokens | decode {s['tokens_per_s']:.1f} tokens/s")
    if "hit_rate" in s:
        line += (f" | experts: hit rate {s['hit_rate']:.3f}, {s['misses']} misses, H2D {_fmt_bytes(s['h2d_bytes'])}, "
                 f"stall {s['stall_s'] * 1e3:.1f} ms, resident {_fmt_bytes(s['expert_bytes_resident'])}")
    print(line + "]", file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    import ef_jax
    from ef_jax.config import SUPPORTED
    model = ef_jax.load(args.model, dtype=args.dtype)
    cfg = model.config
    b, c = model.param_bytes(), model.param_counts()
    print(f"model        {model.path}")
    print(f"architecture {SUPPORTED[cfg.family]} ({cfg.family})")
    print(f"layers       {cfg.num_layers} ({cfg.num_moe_layers} MoE: {list(cfg.moe_layer_ids)})")
    print(f"attention    {cfg.attention}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, head dim {cfg.head_dim}")
    print(f"experts      {cfg.num_experts} per MoE layer, top-{cfg.top_k}, D={cfg.hidden_size}, F={cfg.moe_intermediate}"
          + (f", shared expert F={cfg.shared_intermediate}" if cfg.shared_intermediate else ""))
    print(f"parameters   {c['total']:,} total = {c['experts']:,} in routed experts + {c['other']:,} other")
    print(f"bytes ({model.dtype}) experts {_fmt_bytes(b['experts'])}, other {_fmt_bytes(b['other'])}, "
          f"per expert {_fmt_bytes(b['per_expert'])}")
    print(f"tokenizer    {'yes' if model.tokenizer is not None else 'none'}")
    return 0


def _cmd_trace(args) -> int:
    import ef_jax
    from ef_jax.engine.batch import normalize_prompts
    from ef_jax.engine.forward import save_routing_trace
    model = ef_jax.load(args.model, dtype=args.dtype)
    with open(args.text, encoding="utf-8") as f:
        texts = [t for t in (f.read().split("\n\n") if args.split_paragraphs else [f.read()]) if t.strip()]
    if not texts:
        raise ValueError(f"--text {args.text} holds no text")
    ids, _ = normalize_prompts(texts, model.tokenizer, model.config.vocab_size)
    chunks = [seq[i:i + args.max_tokens] for seq in ids for i in range(0, len(seq), args.max_tokens)]
    experts = save_routing_trace(model, chunks, args.out)
    print(f"wrote {args.out}: {experts.shape[0]} tokens × {experts.shape[1]} MoE layers × top-{experts.shape[2]} "
          f"in {len(chunks)} sequences")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ef-jax", description="Run MoE LLMs with offloaded experts (ExpertFlow).")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped model)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--expert-memory", default=None, help="device budget for routed experts, e.g. 2GiB")
    g.add_argument("--slots-per-layer", type=int, default=None)
    g.add_argument("--policy", default=None, help="offload cache policy (nocache, lru, lfu, ...)")
    g.add_argument("--timeline", default=None, help="write a Chrome/Perfetto trace JSON here")
    g.set_defaults(fn=_cmd_generate)

    i = sub.add_parser("info", help="architecture, parameter counts and bytes of a checkpoint")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    i.set_defaults(fn=_cmd_info)

    t = sub.add_parser("trace", help="record per-token routing of a text to an .npz trace")
    t.add_argument("--model", default=None)
    t.add_argument("--text", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    t.add_argument("--max-tokens", type=int, default=512, help="tokens per traced sequence")
    t.add_argument("--split-paragraphs", action="store_true", help="one sequence per blank-line-separated block")
    t.set_defaults(fn=_cmd_trace)

    try:
        from ef_jax.sim import cli as sim_cli
        sim_cli.add_parser(sub)
    except ImportError:  # the simulator package is optional at this layer
        pass
    try:
        from ef_jax.evalpolicy import cli as evalpolicy_cli
        evalpolicy_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from ef_jax.hybrid import cli as hybrid_cli
        hybrid_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from ef_jax.quant import cli as quant_cli
        quant_cli.add_parser(sub)
    except ImportError:  # the quantization package is optional at this layer
        pass
    try:
        from ef_jax.predict import cli as predict_cli
        predict_cli.add_parser(sub)
    except ImportError:  # the predictor needs flax/optax
        pass
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"ef-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
