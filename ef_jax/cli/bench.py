"""`ef-jax bench`: prompt processing and generation tokens/s of your model on this machine, resident and offloaded
at a few budgets, policies and step modes (ef_jax.bench), as a markdown table or JSON.

[--model DIR | org/name] → checks → ef_jax.load → ef_jax.bench.bench(configs) → table | --json
"""
from __future__ import annotations

import argparse
import json

from ef_jax.cli.convert import add_load_args, load_kwargs
from ef_jax.cli.guards import UsageError, positive


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give fractions separated by commas, e.g. 0.25,0.5") from None


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="tokens/s of a model on this machine, resident and offloaded",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    p.add_argument("--budgets", type=_floats, default=[0.25, 0.5],
                   help="offload budgets as fractions of each MoE layer's experts, comma-separated (default 0.25,0.5)")
    p.add_argument("--policies", type=_names, default=["lru"], help="cache policies, comma-separated (default lru)")
    p.add_argument("--steps", type=_names, default=["layer"],
                   help="step modes, comma-separated: layer, device (default layer)")
    p.add_argument("--no-resident", action="store_true", help="skip the all-resident row (e.g. it does not fit)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prompt processing (pp)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per run (tg)")
    p.add_argument("--repetitions", type=int, default=3, help="timed runs per configuration, after one burn-in")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    add_load_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    import ef_jax
    from ef_jax.bench import bench, configs, markdown
    from ef_jax.cache.config import STEP_MODES
    from ef_jax.cli.model import preflight
    from ef_jax.policies.registry import policy_names
    for flag in ("--prompt-tokens", "--gen-tokens", "--repetitions"):
        positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.gen_tokens < 2:
        raise UsageError("--gen-tokens must be at least 2: generation speed needs a decode step")
    bad = [s for s in args.steps if s not in STEP_MODES] + [p for p in args.policies if p not in policy_names("engine")]
    if bad:
        raise UsageError(f"unknown step mode or policy {bad[0]!r}: steps are {', '.join(STEP_MODES)}; policies "
                         f"{', '.join(policy_names('engine'))}")
    pf = preflight("--model", args.model, with_tokenizer=False)
    try:
        cfgs = configs(pf.config.num_experts, pf.config.top_k, args.budgets, args.policies, args.steps,
                       resident=not args.no_resident)
    except ValueError as e:
        raise UsageError(f"--budgets: {e}") from None
    from ef_jax.cli.support import check_run  # the kernel's rows (each config's own are checked by the Forward)
    check_run(offloaded=False, policy="resident", num_experts=pf.config.num_experts,
              num_moe_layers=pf.config.num_moe_layers, expert_kernel=args.expert_kernel,
              expert_dims=(pf.config.hidden_size, pf.config.moe_intermediate))
    model = ef_jax.load(pf.path, dtype=args.dtype, **load_kwargs(args))
    record = bench(model, cfgs, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                   repetitions=args.repetitions)
    print(json.dumps(record) if args.json else markdown(record))
    return 0
