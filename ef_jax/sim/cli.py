"""`ef-jax sim`: replay a routing trace through a cache policy and print hit rate, bytes and stall.

[TRACE.npz] → load_trace → first --tokens tokens → replay(policy, slots, batch, timing) → summary | JSON
"""
from __future__ import annotations

import argparse
import json
import sys

from ef_jax.policies.registry import policy_names
from ef_jax.sim.replay import TIMING_PRESETS, replay
from ef_jax.trace import load_trace


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sim` on an argparse subparsers object; its defaults `func` and `fn` are `run`."""
    p = subparsers.add_parser("sim", help="replay a routing trace through an expert cache policy",
                              description=__doc__.splitlines()[0])
    p.add_argument("trace", help="routing trace .npz (experts u8[N, L, K], offsets, prompt_id, tokens)")
    p.add_argument("--slots-per-layer", type=int, required=True, help="expert slots per MoE layer")
    p.add_argument("--policy", default="lru", help=f"eviction policy: {', '.join(policy_names())} (default lru)")
    p.add_argument("--tokens", type=int, default=None, help="replay only the first N tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="tokens per step; a layer needs their union")
    p.add_argument("--timing", default="h100", choices=sorted(TIMING_PRESETS) + ["none"],
                   help="copy/compute timing preset (default h100; 'none': hit counts only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.set_defaults(func=run, fn=run)  # ef_jax.cli dispatches on `fn`
    return p


def run(args: argparse.Namespace) -> int:
    """Run `ef-jax sim`; returns the process exit code (2 on bad input)."""
    try:
        trace = load_trace(args.trace)
        experts = trace.experts if args.tokens is None else trace.experts[:args.tokens]
        if args.tokens is not None and args.tokens < 1:
            raise ValueError(f"--tokens={args.tokens} must be ≥ 1")
        stats = replay(experts, slots_per_layer=args.slots_per_layer, policy=args.policy,
                       timing=None if args.timing == "none" else args.timing, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"ef-jax sim: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"trace": args.trace, "timing": args.timing, **stats.to_dict()}))
    else:
        print(summary(stats, args.timing))
    return 0


def summary(s, timing_name: str) -> str:
    lines = [
        f"policy {s.policy}, {s.slots_per_layer} slots/layer, batch {s.batch_size}: {s.tokens} tokens in "
        f"{s.steps} steps",
        f"hit rate {s.hit_rate:.4f} ({s.hits} hits, {s.misses} misses, {s.late} late)",
        f"loads {s.loads} ({s.demand_loads} demand, {s.prefetch_issued} prefetch: {s.prefetch_used} used, "
        f"{s.prefetch_wasted} wasted)",
    ]
    if s.stall_s is not None:
        lines.append(f"timing {timing_name}: {s.bytes_per_token / 1e6:.1f} MB/token host→device, stall "
                     f"{s.stall_per_token_s * 1e3:.3f} ms/token, total {s.total_s:.3f} s "
                     f"({s.tokens / s.total_s:.1f} tokens/s)")
    return "\n".join(lines)
