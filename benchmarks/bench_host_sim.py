"""never / auto / always host compute in the simulator, on a routing trace, under every preset with a host timing.

[trace experts i[N, L, K]] → replay(policy, slots = fraction × E, preset, host_compute) → stall per token, hit
rate, MB/token copied, share of misses computed on the host → benchmarks/results/host_sim_<trace>.{json,md}

Policies: any simulator policy by name, and `predictive`: ExpertFlow's predictive cache (arXiv 2410.17954) driven
by a routing-path predictor. A trace has no hidden states, so the model-bound predictors (pre-gate scores, the
trained path predictor) cannot run here; the path predictor used is the previous token's routing (frequency of the
trace's other tokens breaks ties), ef_jax.predict.baselines.PreviousTokenBaseline — the weakest one the project
has, so its rows are a lower bound on what prediction buys `auto`.

  python benchmarks/bench_host_sim.py ../shared/data/routing/deepseek-v2-lite-puffin-dev.npz --tokens 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from ef_jax.cache.timing import TIMING_PRESETS
from ef_jax.policies.predictive import Predictive
from ef_jax.predict.baselines import PreviousTokenBaseline
from ef_jax.sim.replay import replay
from ef_jax.trace import load_trace
from results_io import git_commit, write_results

MODES = ("never", "always", "auto")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--policies", nargs="*", default=["lru", "lfu", "predictive"])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.25, 0.5])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    trace = load_trace(args.trace)
    experts = trace.experts[:args.tokens].astype("int64")
    E = int(trace.experts.max()) + 1
    scores = path_scores(trace, E, args.tokens)
    presets = [n for n, t in sorted(TIMING_PRESETS.items()) if t.host is not None]
    rows = []
    for preset in presets:
        for policy in args.policies:
            for frac in args.fractions:
                r = {m: replay(experts, slots_per_layer=int(E * frac), policy=make_policy(policy, scores, experts),
                               timing=preset, num_experts=E, host_compute=m) for m in MODES}
                row = {"preset": preset, "policy": policy, "resident": frac}
                for m, s in r.items():
                    row[m] = {"stall_ms_per_token": s.stall_per_token_s * 1e3, "hit_rate": s.hit_rate,
                              "mb_per_token": s.bytes_per_token / 1e6,
                              "hosted_share": s.host_computed / max(s.misses, 1),
                              "host_ms_per_token": (s.host_s or 0) * 1e3 / s.tokens}
                row["auto_over_never"] = r["auto"].stall_s / r["never"].stall_s
                rows.append(row)
                print(preset, policy, frac, {m: round(row[m]["stall_ms_per_token"], 3) for m in MODES},
                      round(row["auto_over_never"], 3), flush=True)
    timings = {n: {"h2d_gb_per_s": t.h2d_bytes_per_s / 1e9, "layer_compute_ms": t.layer_compute_s * 1e3,
                   "host_gb_per_s": t.host.bytes_per_s / 1e9, "host_token_cost": t.host.token_cost,
                   "host_source": t.host.source} for n, t in TIMING_PRESETS.items() if t.host is not None}
    record = {"trace": os.path.basename(args.trace), "tokens": len(experts), "experts": E,
              "layers": experts.shape[1], "top_k": experts.shape[2], "commit": git_commit(), "device": "simulator",
              "timings": timings, "rows": rows}
    stem = "host_sim_" + os.path.splitext(os.path.basename(args.trace))[0]
    write_results(args.out, stem, record, markdown(record))
    return 0


def path_scores(trace, num_experts: int, tokens: int):
    """f32[tokens, L, E]: the previous token's routing (same prompt), ties broken by the frequency of the tokens
    after the replayed ones (so the replayed routing is not counted twice)."""
    held = dataclasses.replace(trace, experts=trace.experts[tokens:], offsets=trace.offsets[trace.offsets >= tokens]
                               - tokens)
    head = dataclasses.replace(trace, experts=trace.experts[:tokens],
                               offsets=np.append(trace.offsets[trace.offsets < tokens], tokens))
    return PreviousTokenBaseline(num_experts).fit(held).scores(head)


def make_policy(name: str, scores, experts):
    """A fresh policy per replay (a Predictive keeps per-run state)."""
    if name != "predictive":
        return name
    return Predictive(scores=scores, top_k=experts.shape[-1])


def markdown(r: dict) -> str:
    lines = [f"# Host compute in the simulator: {r['trace']}, first {r['tokens']} tokens, batch 1, commit "
             f"{r['commit']}", "", "Stall ms per token (virtual clock); hosted = share of misses computed on the host.",
             "", "| preset | copy GB/s | host GB/s | policy | resident | never | always | auto (hosted) | auto/never |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        t = r["timings"][x["preset"]]
        lines.append(f"| {x['preset']} | {t['h2d_gb_per_s']:.1f} | {t['host_gb_per_s']:.1f} | {x['policy']} | "
                     f"{x['resident']:.0%} | {x['never']['stall_ms_per_token']:.2f} | "
                     f"{x['always']['stall_ms_per_token']:.2f} | {x['auto']['stall_ms_per_token']:.2f} "
                     f"({x['auto']['hosted_share']:.2f}) | {x['auto_over_never']:.2f} |")
    lines += ["", "Host timings:"] + [f"- {n}: {t['host_source']}" for n, t in r["timings"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
