"""`ef-jax sim`: replay a routing trace through a cache policy and print hit rate, bytes and stall.

[TRACE.npz] → load_trace → first --tokens tokens → replay(policy, slots, batch, timing[, --expert-bytes])
    → summary | JSON

A trace holds routing only, not the model's expert size: bytes and stall follow the timing preset's expert
(17.3 MB, DeepSeek-V2-Lite bf16, for h100) unless --expert-bytes gives the traced model's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ef_jax.cache.host_compute import HOST_COMPUTE_MODES
from ef_jax.cli.guards import UsageError, input_npz, positive
from ef_jax.policies.registry import policy_names
from ef_jax.sim.replay import TIMING_PRESETS, replay
from ef_jax.trace import load_trace


def sim_policies() -> list[str]:
    """Policies a trace replay can drive: those that need no model (router weights, hidden states, predictor)."""
    return [n for n in policy_names("simulator") if n != "predictive"]  # predictive needs a predictor or scores


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sim` on an argparse subparsers object; its defaults `func` and `fn` are `run`."""
    p = subparsers.add_parser("sim", help="replay a routing trace through an expert cache policy",
                              description=__doc__.splitlines()[0])
    p.add_argument("trace", help="routing trace .npz (experts u8[N, L, K], offsets, prompt_id, tokens)")
    p.add_argument("--slots-per-layer", type=int, required=True, help="expert slots per MoE layer")
    p.add_argument("--policy", default="lru", choices=sim_policies(),
                   help="eviction policy (model-bound policies run in generate / eval-policy)")
    p.add_argument("--tokens", type=int, default=None, help="replay only the first N tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="tokens per step; a layer needs their union")
    p.add_argument("--timing", default="h100", choices=sorted(TIMING_PRESETS) + ["none"],
                   help="copy/compute timing preset ('none': hit counts only)")
    p.add_argument("--expert-bytes", type=int, default=None, metavar="N",
                   help="bytes of one of the traced model's experts (default: the timing preset's, 17.3 MB)")
    p.add_argument("--host-compute", choices=list(HOST_COMPUTE_MODES), default="never",
                   help="what a miss becomes: never (copied into a slot), always (computed on the host, from its "
                        "pinned weights), auto (per miss, whichever ends the layer sooner; ef_jax.cache.host_compute)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also replay --policy, lru and belady at six budgets from top-k to every expert and draw "
                        "hit rate, MB/token and stall per token (needs the plot extra)")
    p.set_defaults(func=run, fn=run)  # ef_jax.cli.commands dispatches on `fn`
    return p


def _timing(args):
    if args.timing == "none":
        if args.expert_bytes is not None:
            raise UsageError("--expert-bytes sizes the copies of a timing preset: drop it or give --timing h100")
        return None
    preset = TIMING_PRESETS[args.timing]
    if args.expert_bytes is None:
        return preset
    return dataclasses.replace(preset, expert_bytes=args.expert_bytes)


def run(args: argparse.Namespace) -> int:
    """Run `ef-jax sim`; returns the process exit code (2 on bad input, one line on stderr)."""
    try:
        positive("--slots-per-layer", args.slots_per_layer)
        positive("--tokens", args.tokens)
        positive("--batch-size", args.batch_size)
        positive("--expert-bytes", args.expert_bytes)
        input_npz("TRACE", args.trace, "`ef-jax trace`")
        if args.plot:
            from ef_jax.plot import check_output
            check_output(args.plot)
        timing = _timing(args)
        trace = load_trace(args.trace)
        experts = trace.experts if args.tokens is None else trace.experts[:args.tokens]
        if args.host_compute != "never" and timing is None:
            raise UsageError(f"--host-compute {args.host_compute} needs a timing preset (the host FFN's speed): "
                             "drop --timing none")
        stats = replay(experts, slots_per_layer=args.slots_per_layer, policy=args.policy, timing=timing,
                       batch_size=args.batch_size, host_compute=args.host_compute)
        if args.plot:
            _plot(args, experts, timing)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"ef-jax sim: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        extra = {} if timing is None else {"expert_bytes": timing.expert_bytes,
                                           "expert_bytes_from": "--expert-bytes" if args.expert_bytes else "preset"}
        print(json.dumps({"trace": args.trace, "timing": args.timing, **extra, **stats.to_dict()}))
    else:
        print(summary(stats, args.timing, timing.expert_bytes if timing else None, args.expert_bytes is None))
    return 0


def sweep(experts, policies, timing, batch_size: int = 1, points: int = 6) -> list[dict]:
    """Replay rows (policy, slots_per_layer, hit_rate, mb_per_token, stall_ms_per_token) over `points` budgets
    from top-k slots to every expert."""
    import numpy as np
    K, E = experts.shape[2], int(experts.max()) + 1
    rows = []
    for slots in sorted({int(round(s)) for s in np.linspace(K, E, points)}):
        for policy in policies:
            s = replay(experts, slots_per_layer=slots, policy=policy, timing=timing, batch_size=batch_size,
                       num_experts=E)
            rows.append({"policy": s.policy, "slots_per_layer": slots, "hit_rate": s.hit_rate,
                         "mb_per_token": None if s.stall_s is None else s.bytes_per_token / 1e6,
                         "stall_ms_per_token": None if s.stall_s is None else s.stall_per_token_s * 1e3})
    return rows


def _plot(args, experts, timing) -> None:
    from ef_jax.plot import plot_sweep
    policies = list(dict.fromkeys([args.policy, "lru", "belady"]))
    rows = sweep(experts, policies, timing, args.batch_size)
    plot_sweep(rows, args.plot, title=f"{args.trace}: {len(experts)} tokens, batch {args.batch_size}, timing "
                                      f"{args.timing}")
    print(f"wrote {args.plot}", file=sys.stderr)


def summary(s, timing_name: str, expert_bytes: int | None = None, preset_bytes: bool = True) -> str:
    lines = [
        f"policy {s.policy}, {s.slots_per_layer} slots/layer, batch {s.batch_size}: {s.tokens} tokens in "
        f"{s.steps} steps",
        f"hit rate {s.hit_rate:.4f} ({s.hits} hits, {s.misses} misses, {s.late} late)",
        f"loads {s.loads} ({s.demand_loads} demand, {s.prefetch_issued} prefetch: {s.prefetch_used} used, "
        f"{s.prefetch_wasted} wasted)",
    ]
    if s.stall_s is not None:
        size = f"{expert_bytes / 1e6:.3g} MB experts" + (f" (the {timing_name} preset's; --expert-bytes for the "
                                                        f"traced model's)" if preset_bytes else "")
        lines.append(f"timing {timing_name}, {size}: {s.bytes_per_token / 1e6:.1f} MB/token host→device, stall "
                     f"{s.stall_per_token_s * 1e3:.3f} ms/token ({s.stall_s * 1e3:.1f} ms total), "
                     f"{s.total_s:.3f} s total ({s.tokens / s.total_s:.1f} tokens/s)")
    if s.host_compute != "never":
        lines.append(f"host compute {s.host_compute}: {s.host_computed} misses computed on the host "
                     f"({s.host_computed / max(s.misses, 1):.2f} of misses), host FFN "
                     f"{(s.host_s or 0) * 1e3 / max(s.tokens, 1):.3f} ms/token, "
                     f"{s.bytes_not_moved / max(s.tokens, 1) / 1e6:.1f} MB/token not moved")
    return "\n".join(lines)
