"""How close to Belady can an online policy come? Bytes moved against how much of the future a policy knows.

[text] → teacher-forced decoding through the engine (ef_jax.evalpolicy) under lru and expertflow (its default
prefetch gate, stricter gates, and eviction only) → bytes and stall per token
[the same run's routing] → simulator: lru, lfu, Belady with a k-token lookahead (k = 1 … 16), Belady
→ every row as a multiple of Belady's bytes

Belady's demand paging moves the fewest bytes any policy can, prefetching or not, for the same slots. An online
policy at token t does not know token t+1's routing: that depends on the token not yet sampled. `belady-k`
(Belady(lookahead=k)) knows exactly the next k tokens' routing and evicts by LRU beyond them, so its row says how
much exact future an eviction rule needs to reach a given multiple of the optimum. Deterministic: the engine runs
on the timing preset's virtual clock.

  python benchmarks/bench_eviction_bound.py                      # the shipped model, held-out text, h100 preset
  python benchmarks/bench_eviction_bound.py --trace benchmarks/data/default_model_*.npz   # + simulator-only rows
"""
from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.evalpolicy import evaluate_policy, text_to_ids
from ef_jax.cache.timing import get_timing
from ef_jax.policies.registry import PolicySpec
from ef_jax.sim import replay
from ef_jax.trace import load_trace
from results_io import git_commit, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
LOOKAHEADS = (1, 2, 4, 8, 16)
# expertflow's prefetch gate: min_precision is the floor under the measured break-even precision; 1.01 turns
# prefetching off, leaving its eviction rule (decayed use counts, predicted experts kept).
GATES = ((None, "expertflow (default gate)"), (0.9, "expertflow, precision ≥ 0.9"),
         (0.95, "expertflow, precision ≥ 0.95"), (1.01, "expertflow eviction, no prefetch"))


def sim_rows(routing: np.ndarray, slots: int, num_experts: int, timing: str) -> list[dict]:
    """Simulator rows on routing i[N, L, K]: lru, lfu, belady-k, belady."""
    rows = []
    policies = [("lru", "lru"), ("lfu", "lfu")] + [(PolicySpec("belady", lookahead=k), f"belady, next {k} tokens known")
                                                   for k in LOOKAHEADS] + [("belady", "belady")]
    for pol, label in policies:
        s = replay(np.sort(routing, -1), slots_per_layer=slots, policy=pol, num_experts=num_experts, timing=timing)
        rows.append({"policy": label, "where": "simulator", "mb_per_token": s.bytes_per_token / 1e6,
                     "stall_ms_per_token": 1e3 * s.stall_per_token_s, "hit_rate": s.hit_rate,
                     "prefetch_precision": None})
    return rows


def engine_rows(model, ids, slots: int, timing: str, max_tokens: int) -> tuple[list[dict], np.ndarray]:
    rows, routing = [], None
    runs = [("lru", "lru")] + [(PolicySpec("expertflow", **({} if p is None else {"min_precision": p})), label)
                               for p, label in GATES]
    for pol, label in runs:
        r = evaluate_policy(model, ids, OffloadConfig(slots_per_layer=slots, policy=pol, timing=timing),
                            max_tokens=max_tokens)
        routing = r.routing if routing is None else routing
        if not np.array_equal(routing, r.routing):
            raise RuntimeError(f"{label}: routing differs from lru's; exact routing must not depend on the policy")
        rows.append({"policy": label, "where": "engine", "mb_per_token": r.bytes_per_token / 1e6,
                     "stall_ms_per_token": 1e3 * r.stall_s_per_token, "hit_rate": r.hit_rate,
                     "prefetch_precision": None if np.isnan(r.prefetch_precision) else r.prefetch_precision})
        print(f"  {label}: {rows[-1]['mb_per_token']:.1f} MB/token, stall {rows[-1]['stall_ms_per_token']:.3f} "
              f"ms/token", flush=True)
    return rows, routing


def markdown(rec: dict) -> str:
    lines = [f"# Bytes moved vs Belady — {rec['setup']}", "",
             (f"Device: {rec['device']}; jax {rec['jax']}; clock: virtual {rec['timing']} "
              f"({rec['expert_mb']:.1f} MB per expert); {rec['tokens']} teacher-forced tokens; batch 1; "
              f"commit {rec['commit']}. `belady, next k tokens known` is Belady(lookahead=k): exact routing of the "
              "next k tokens, LRU beyond."), ""]
    for block in rec["blocks"]:
        lines += [(f"## {block['source']}, {block['budget_pct']} % of experts resident ({block['slots']} slots "
                   "per layer)"), "", "| policy | where | MB/token | × Belady | stall ms/token | hit rate | prefetch P |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        bel = block["belady_mb_per_token"]
        for r in block["rows"]:
            p = "–" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.2f}"
            lines.append(f"| {r['policy']} | {r['where']} | {r['mb_per_token']:.1f} | {r['mb_per_token'] / bel:.2f} | "
                         f"{r['stall_ms_per_token']:.3f} | {r['hit_rate']:.3f} | {p} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped model)")
    ap.add_argument("--text", default=os.path.join(HERE, "results", "policies_heldout.txt"))
    ap.add_argument("--trace", nargs="*", default=[], help="routing traces (.npz) for simulator-only rows")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="fractions of experts resident")
    ap.add_argument("--timing", default="h100")
    ap.add_argument("--max-tokens", type=int, default=768)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="eviction_bound_default_h100")
    args = ap.parse_args(argv)
    if not all(0 < b <= 1 for b in args.budgets):
        ap.error(f"--budgets {args.budgets}: each must be a fraction in (0, 1]")
    model = ef_jax.load(args.model)
    cfg = model.config
    with open(args.text, encoding="utf-8") as f:
        ids = text_to_ids(model, f.read())
    E, K = cfg.num_experts, cfg.top_k
    blocks = []
    for frac in args.budgets:
        slots = max(K, round(frac * E))
        print(f"[{int(frac * 100)} %: {slots} slots per layer] engine on {os.path.basename(args.text)}", flush=True)
        rows, routing = engine_rows(model, ids, slots, args.timing, args.max_tokens)
        rows += sim_rows(routing, slots, E, args.timing)
        bel = next(r["mb_per_token"] for r in rows if r["policy"] == "belady")
        blocks.append({"source": os.path.basename(args.text), "budget_pct": int(frac * 100), "slots": slots,
                       "belady_mb_per_token": bel, "rows": rows})
        for path in args.trace:
            tr = load_trace(path)
            print(f"[{int(frac * 100)} %] simulator on {os.path.basename(path)}", flush=True)
            srows = sim_rows(tr.experts.astype(np.int32), slots, E, args.timing)
            blocks.append({"source": os.path.basename(path), "budget_pct": int(frac * 100), "slots": slots,
                           "belady_mb_per_token": srows[-1]["mb_per_token"], "rows": srows})
    rec = {"setup": f"{os.path.relpath(model.path)} on {os.path.basename(args.text)}",
           "device": f"{platform.machine()} {jax.default_backend()}", "jax": jax.__version__,
           "timing": args.timing, "expert_mb": get_timing(args.timing).expert_bytes / 1e6,
           "tokens": args.max_tokens, "commit": git_commit(), "blocks": blocks}
    md = markdown(rec)
    print(md)
    write_results(args.out, args.name, rec, md)


if __name__ == "__main__":
    main()
