"""`ef-jax eval-policy`: teacher-forced decoding of a text through the offload engine under a cache policy.

[--text FILE] → token ids → evaluate_policy(model, ids, OffloadConfig(budget, policy, routing, timing)) → summary | JSON
"""
from __future__ import annotations

import argparse
import json
import math

from ef_jax.cli.guards import HOST_COMPUTE_HELP, UsageError, input_dir, positive, read_text
from ef_jax.cli.model import parse_ids, preflight
from ef_jax.cache.timing import TIMING_PRESETS
from ef_jax.cli.convert import add_load_args, load_kwargs
from ef_jax.cli.devices import add_devices_arg, add_step_arg, load_mesh
from ef_jax.cli.support import check_run


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval-policy` on an argparse subparsers object; its default `fn` is `run`."""
    p = subparsers.add_parser("eval-policy", help="teacher-forced decoding of a text under an offload policy",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    p.add_argument("--text", required=True, help="text file (token ids separated by spaces for tokenizer-less models)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-memory", default=None,
                        help="device budget for routed experts, e.g. 2GiB, or auto (the device's free memory after "
                             "the other weights, the KV cache and a margin)")
    budget.add_argument("--slots-per-layer", type=int, default=None, help="expert slots per MoE layer")
    p.add_argument("--policy", default="expertflow", metavar="NAME",
                   help="cache policy name (expertflow, pregate, lru, nocache, ...) or 'resident' (no offloading)")
    p.add_argument("--routing", choices=["exact", "cache-aware"], default="exact")
    p.add_argument("--routing-tolerance", type=float, default=None,
                   help="δ for cache-aware routing (router-probability difference; default: the documented one)")
    p.add_argument("--timing", default="none", choices=sorted(TIMING_PRESETS) + ["none"],
                   help="charge copies and compute on this preset's virtual clock (default none: wall clock)")
    p.add_argument("--host-compute", choices=["never", "auto", "always"], default="never", help=HOST_COMPUTE_HELP)
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together (the text is split into rows)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row before the KV cache restarts")
    p.add_argument("--max-tokens", type=int, default=1024, help="evaluate at most this many tokens of the text")
    p.add_argument("--hybrid", default=None, help="a train-hybrid output directory: expertflow's predictor")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    add_load_args(p)
    add_devices_arg(p)
    add_step_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="add this run to PNG's .jsonl beside it and draw every run recorded there: stall, MB/token "
                        "and hit rate per policy over the budget (run once per policy and budget; needs the plot "
                        "extra)")
    p.set_defaults(fn=run)
    return p


def build_offload(model, args, budget: dict | None = None):
    """OffloadConfig from the CLI arguments (None for --policy resident); `budget`: the checked budget kwargs
    (--expert-memory auto resolved to bytes), else the flags as given."""
    from ef_jax import OffloadConfig
    if args.policy == "resident":
        return None
    if args.expert_memory is None and args.slots_per_layer is None:
        raise UsageError("give --expert-memory (e.g. 2GiB) or --slots-per-layer N (or --policy resident)")
    policy = args.policy
    if args.hybrid:
        from ef_jax.hybrid.predictor import HybridPredictor
        from ef_jax.policies.registry import PolicySpec
        policy = PolicySpec("expertflow", predictor=HybridPredictor.load(args.hybrid, model))
    budget = budget or {"expert_memory": args.expert_memory, "slots_per_layer": args.slots_per_layer}
    return OffloadConfig(**budget, policy=policy,
                         routing=args.routing, routing_tolerance=args.routing_tolerance,
                         timing=None if args.timing == "none" else args.timing, step=args.step,
                         host_compute=args.host_compute)


def _check_args(args, pf) -> tuple[dict | None, dict | None]:
    """Every refusal that needs no weights, before the model loads. Returns offload_budget's (budget kwargs, auto
    record), (None, None) for --policy resident."""
    from ef_jax.cli.model import offload_budget
    from ef_jax.model import default_dtype
    from ef_jax.policies.registry import policy_names
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--max-tokens", args.max_tokens)):
        positive(flag, value)
    if args.policy != "resident" and args.policy not in policy_names():
        raise UsageError(f"--policy {args.policy} is unknown: choose one of resident, {', '.join(policy_names())}")
    if args.policy == "resident":
        if args.expert_memory is not None or args.slots_per_layer is not None or args.hybrid:
            raise UsageError("--policy resident keeps every expert on the device: drop --expert-memory / "
                             "--slots-per-layer / --hybrid")
    elif args.expert_memory is None and args.slots_per_layer is None:
        raise UsageError("give --expert-memory (e.g. 2GiB) or --slots-per-layer N (or --policy resident)")
    if args.routing_tolerance is not None and args.routing != "cache-aware":
        raise UsageError("--routing-tolerance applies to cache-aware routing: add --routing cache-aware")
    check_run(offloaded=args.policy != "resident", policy=args.policy, num_experts=pf.config.num_experts,
              num_moe_layers=pf.config.num_moe_layers, step=args.step, devices=args.devices,
              hybrid=args.hybrid is not None, auto_budget=args.expert_memory == "auto", routing=args.routing,
              timing=args.timing != "none", host_compute=args.host_compute, expert_kernel=args.expert_kernel,
              expert_dims=(pf.config.hidden_size, pf.config.moe_intermediate))
    if args.hybrid:
        input_dir("--hybrid", args.hybrid, "config.json", "`ef-jax train-hybrid --out`")
    if args.policy == "resident":
        return None, None
    # rows × seq_len positions: the largest KV cache the run decodes with (rows are never longer)
    return offload_budget(args, pf, args.dtype or default_dtype(), (args.batch_size, args.seq_len))


def run(args: argparse.Namespace) -> int:
    import ef_jax
    from ef_jax.evalpolicy.harness import evaluate_policy
    pf = preflight("--model", args.model)
    if args.plot:
        from ef_jax.plot import check_output
        check_output(args.plot)
    budget, auto = _check_args(args, pf)
    text = read_text("--text", args.text)
    ids = _text_ids(text, pf)
    model = ef_jax.load(pf.path, dtype=args.dtype, **load_kwargs(args), **load_mesh(args))
    res = evaluate_policy(model, ids, build_offload(model, args, budget), batch_size=args.batch_size,
                          seq_len=args.seq_len, max_tokens=args.max_tokens)
    record = {"model": model.path, "text": args.text, "timing": args.timing, "batch_size": args.batch_size,
              "routing": args.routing, "budget_auto": auto, **res.to_dict(),
              # a timing preset counts its own expert size in bytes_per_token; this is what really moved
              "real_bytes_per_token": res.stats["cache_loads"] * model.param_bytes()["per_expert"] / res.tokens}
    if args.json:
        print(json.dumps(record, default=_jsonable))
    else:
        print(summary(record))
    if args.plot:
        _plot(args.plot, record, res, model)
    return 0


def _plot(png: str, record: dict, res, model) -> None:
    """Appends this run's row to PNG's .jsonl and draws all rows there (one line per policy over the budget)."""
    import sys

    from ef_jax.plot import plot_sweep
    slots = res.stats.get("slots_per_layer") or model.config.num_experts  # resident: every expert
    stall = record.get("stall_s_per_token")
    row = {"policy": record.get("policy") or "resident", "slots_per_layer": slots, "hit_rate": record.get("hit_rate"),
           "mb_per_token": record["real_bytes_per_token"] / 1e6,
           "stall_ms_per_token": None if stall is None else stall * 1e3}
    rows_path = png[:-4] + ".jsonl"
    with open(rows_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_jsonable) + "\n")
    with open(rows_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    plot_sweep(rows, png, title=f"eval-policy on {record['text']} ({len(rows)} runs in {rows_path})")
    print(f"wrote {png} ({len(rows)} runs from {rows_path})", file=sys.stderr)


def _text_ids(text: str, pf) -> list[int]:
    """As evalpolicy.harness.text_to_ids, from the preflight (so a bad --text is refused before the weights load)."""
    if pf.tokenizer is not None:
        return list(pf.tokenizer(text, add_special_tokens=False)["input_ids"])
    return parse_ids("--text (this checkpoint has no tokenizer, so it must hold token ids)", text,
                     pf.config.vocab_size)


def _jsonable(x):
    return float(x) if hasattr(x, "__float__") else str(x)


def summary(r: dict) -> str:
    clock = "virtual" if r["timing"] != "none" else "wall"
    prec = "n/a" if math.isnan(r["prefetch_precision"]) else f"{r['prefetch_precision']:.3f}"
    rec = "n/a" if math.isnan(r["prefetch_recall"]) else f"{r['prefetch_recall']:.3f}"
    moved = f"{r['bytes_per_token'] / 1e6:.2f} MB/token host→device"
    if clock == "virtual" and r.get("real_bytes_per_token") is not None:
        moved += (f" at the {r['timing']} preset's expert size ({r['real_bytes_per_token'] / 1e6:.3f} MB/token "
                  f"really moved)")
    return "\n".join([
        f"policy {r['policy']} ({r['routing']} routing), batch {r['batch_size']}: {r['tokens']} tokens, "
        f"perplexity {r['perplexity']:.3f}",
        f"hit rate {r['hit_rate']:.4f} | {moved} | stall {r['stall_s_per_token'] * 1e3:.3f} ms/token "
        f"({clock} clock{', ' + r['timing'] if clock == 'virtual' else ''})",
        f"prefetch precision {prec}, recall {rec}, mean horizon {r['mean_horizon']:.2f} layers",
    ] + ([f"host compute {r['stats']['host_compute']}: {r['stats']['host_computed']} misses computed on the host, "
          f"{r['stats']['bytes_not_moved'] / max(r['tokens'], 1) / 1e6:.2f} MB/token not moved"]
         if r.get("stats", {}).get("host_compute", "never") != "never" else []))
