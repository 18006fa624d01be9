"""Cache policies side by side in one run: tokens/s, stall per token, bytes and H2D GB/s vs the peak.

Teacher-forced decoding of the same text through the offload engine (ef_jax.evalpolicy) for each policy —
resident / nocache / lru / pregate / predictive (when registered and buildable) / expertflow / expertflow +
cache-aware routing — at each budget (a fraction of each layer's experts) and batch size; Belady's demand paging
replayed in the simulator on the routing the lru run saw (the bytes bound). With --timing PRESET, copies and
compute run on the simulator's virtual clock (deterministic; numbers stand for the preset's hardware, tokens/s
included); without it, the wall clock of this machine and its measured pinned H2D peak.

  python benchmarks/bench_policies.py --timing h100 --text FILE             # the shipped model, CPU-friendly
  python benchmarks/bench_policies.py --model DIR --text FILE               # GPU: real time
  python benchmarks/bench_policies.py --replay TRACE.npz --replay-layers 4  # DeepSeek-V2-Lite-shaped random model,
                                                                            # routing replayed from a real trace
  python benchmarks/bench_policies.py --tiny --out DIR                      # CPU smoke mode (a test runs it)
  python benchmarks/bench_policies.py --timing h100 --text FILE --tolerance-sweep 0 0.01 0.02 0.05 0.1
      # cache-aware routing: perplexity and greedy agreement vs exact routing against bytes moved, per δ
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform

import jax
import numpy as np

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.evalpolicy import evaluate_policy, text_to_ids
from ef_jax.cache.timing import get_timing
from ef_jax.policies.registry import POLICIES
from ef_jax.random_model import presets, random_model, with_layers
from ef_jax.sim import replay
from results_io import git_commit, write_results

POLICY_ROWS = ["resident", "nocache", "lru", "pregate", "predictive", "expertflow", "expertflow+cache-aware",
               "expertflow+hybrid"]


def measure_h2d_peak(nbytes: int) -> float:
    from bench_offload import measure_h2d_peak as peak  # one definition of the measurement, shared
    return peak(nbytes)


def offload_for(name: str, slots: int, timing, model=None, hybrid: str | None = None) -> OffloadConfig | None:
    if name == "resident":
        return None
    if name == "expertflow+hybrid":  # the hybrid cross-layer predictor from `ef-jax train-hybrid`
        from ef_jax.hybrid import HybridPredictor
        from ef_jax.policies.registry import PolicySpec
        pol = PolicySpec("expertflow", predictor=HybridPredictor.load(hybrid, model))
        return OffloadConfig(slots_per_layer=slots, policy=pol, timing=timing)
    if name == "expertflow+cache-aware":
        return OffloadConfig(slots_per_layer=slots, policy="expertflow", routing="cache-aware", timing=timing)
    if name == "predictive":  # no trained predictor here: the online lookup table
        from ef_jax.policies.registry import PolicySpec
        return OffloadConfig(slots_per_layer=slots, policy=PolicySpec("predictive", predictor="online"), timing=timing)
    return OffloadConfig(slots_per_layer=slots, policy=name, timing=timing)


def trace_override(experts: np.ndarray, batch: int):
    """route_override replaying `experts` [N, L, K]: row b at step s takes token (s·B + b) mod N; layer j mod L."""
    N, L, _ = experts.shape

    def override(step, j, routed):
        rows = (step * batch + np.arange(len(routed))) % N
        return experts[rows, j % L].astype(np.int32)
    return override


def run_row(model, ids, name, slots, batch, args, timing, override):
    offload = offload_for(name, slots, timing, model, args.hybrid)
    if offload is None and override is not None:
        return None  # a replayed route has no resident counterpart
    try:
        r = evaluate_policy(model, ids, offload, batch_size=batch, seq_len=args.seq_len, max_tokens=args.tokens,
                            route_override=override)
    except (ValueError, TypeError) as e:  # e.g. a registered policy that needs a trained predictor
        print(f"  {name}: skipped ({e})")
        return None
    s = r.stats
    total = r.wall_s
    if timing is not None:  # resident on the virtual clock: every MoE layer computes, nothing waits
        t = get_timing(timing)
        total = s.get("virtual_total_s") or r.tokens / batch * model.config.num_moe_layers * t.layer_compute_s
    row = {"policy": name, "budget": args._frac, "slots_per_layer": slots, "batch": batch, "tokens": r.tokens,
           "tokens_per_s": r.tokens / total if total else float("nan"), "wall_tokens_per_s": r.tokens / r.wall_s,
           "stall_ms_per_token": 1e3 * r.stall_s_per_token, "mb_per_token": r.bytes_per_token / 1e6,
           "h2d_gb_per_s": s.get("h2d_bytes", 0) / total / 1e9 if total else 0.0, "hit_rate": r.hit_rate,
           "prefetch_precision": r.prefetch_precision, "prefetch_recall": r.prefetch_recall,
           "mean_horizon": r.mean_horizon, "perplexity": r.perplexity,
           "routing_substitutions": s.get("routing_substitutions", 0)}
    return row, r


def belady_row(routing, slots, batch, E, timing, frac):
    try:
        sim = replay(np.sort(routing, -1), slots_per_layer=slots, policy="belady", batch_size=batch, num_experts=E,
                     timing=timing or "h100")
    except ValueError as e:  # the simulator has no multi-pass layers: a batch union larger than the slots
        print(f"  belady (sim): skipped ({str(e).splitlines()[0]})")
        return None
    return {"policy": "belady (sim)", "budget": frac, "slots_per_layer": slots, "batch": batch, "tokens": sim.tokens,
            "tokens_per_s": sim.tokens / sim.total_s, "wall_tokens_per_s": float("nan"),
            "stall_ms_per_token": 1e3 * sim.stall_per_token_s, "mb_per_token": sim.bytes_per_token / 1e6,
            "h2d_gb_per_s": sim.bytes_h2d / sim.total_s / 1e9, "hit_rate": sim.hit_rate,
            "prefetch_precision": float("nan"), "prefetch_recall": float("nan"), "mean_horizon": 0.0,
            "perplexity": float("nan"), "routing_substitutions": 0}


def tolerance_sweep(model, ids, args, timing) -> dict:
    """expertflow with cache-aware routing at each δ vs exact routing: perplexity cost, greedy-token agreement
    (teacher-forced argmax), bytes per token, at each budget; batch 1."""
    cfg, rows = model.config, []
    for frac in args.budgets:
        slots = min(cfg.num_experts, max(cfg.top_k, round(frac * cfg.num_experts)))
        exact = evaluate_policy(model, ids, OffloadConfig(slots_per_layer=slots, policy="expertflow", timing=timing),
                                seq_len=args.seq_len, max_tokens=args.tokens)
        for tol in args.tolerance_sweep:
            r = evaluate_policy(model, ids, OffloadConfig(slots_per_layer=slots, policy="expertflow", timing=timing,
                                                          routing="cache-aware", routing_tolerance=tol),
                                seq_len=args.seq_len, max_tokens=args.tokens)
            rows.append({"budget": frac, "slots_per_layer": slots, "tolerance": tol, "perplexity": r.perplexity,
                         "perplexity_cost": r.perplexity / exact.perplexity - 1,
                         "greedy_agreement": float((r.argmax == exact.argmax).mean()),
                         "mb_per_token": r.bytes_per_token / 1e6, "exact_mb_per_token": exact.bytes_per_token / 1e6,
                         "stall_ms_per_token": 1e3 * r.stall_s_per_token, "hit_rate": r.hit_rate,
                         "substitutions_per_token": r.stats["routing_substitutions"] / r.tokens})
            print(f"  {int(frac * 100)}% δ={tol}: perplexity {r.perplexity:.3f} ({100 * rows[-1]['perplexity_cost']:+.2f} %), "
                  f"agreement {rows[-1]['greedy_agreement']:.3f}, {rows[-1]['mb_per_token']:.1f} MB/token "
                  f"(exact {rows[-1]['exact_mb_per_token']:.1f})", flush=True)
    return {"rows": rows}


def sweep_markdown(record: dict) -> str:
    lines = [f"# Cache-aware routing: quality vs bytes — {record['setup']}", "",
             f"expertflow, batch 1, {record['tokens']} teacher-forced tokens, clock {record['clock']}; δ is a "
             f"router-probability difference; cost and agreement against exact routing. Commit {record['commit']}.", "",
             "| budget | δ | perplexity | cost | greedy agreement | MB/token (exact) | stall ms/token | hit rate | "
             "swaps/token |", "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {int(r['budget'] * 100)}% | {r['tolerance']} | {r['perplexity']:.3f} | "
                     f"{100 * r['perplexity_cost']:+.2f} % | {r['greedy_agreement']:.3f} | {r['mb_per_token']:.1f} "
                     f"({r['exact_mb_per_token']:.1f}) | {r['stall_ms_per_token']:.3f} | {r['hit_rate']:.3f} | "
                     f"{r['substitutions_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


def load_setup(args):
    """(model, token ids, route_override factory or None, description)."""
    if args.tiny:
        cfg = with_layers(presets()["tiny"], 4)
        if args.replay:
            cfg = dataclasses.replace(cfg, num_experts=64, top_k=6)
        model = random_model(cfg, seed=0)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens).tolist()
        return model, ids, "tiny random model (4 MoE layers, CPU smoke mode)"
    if args.replay and args.replay_shape == "small":  # same routing and virtual clock, CPU-sized weights
        cfg = dataclasses.replace(with_layers(presets()["tiny"], args.replay_layers), num_experts=64, top_k=6)
        model = random_model(cfg, seed=0)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens).tolist()
        return model, ids, (f"small random model (64 experts, top-6, {args.replay_layers} MoE layers), routing "
                            f"replayed from {os.path.basename(args.replay)}")
    if args.replay:
        cfg = with_layers(presets()["deepseek-v2-lite"], args.replay_layers)
        model = random_model(cfg, dtype=args.dtype or ef_jax.model.default_dtype(), seed=0)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens).tolist()
        return model, ids, f"DeepSeek-V2-Lite-shaped random model ({args.replay_layers} MoE layers), routing replayed"
    if not args.text:
        raise SystemExit("--text FILE is required (or --tiny / --replay)")
    model = ef_jax.load(args.model, dtype=args.dtype)
    with open(args.text, encoding="utf-8") as f:
        ids = text_to_ids(model, f.read())
    return model, ids, f"{model.path} on {os.path.basename(args.text)}"


def markdown(record: dict) -> str:
    rows = record["rows"]
    fmt = lambda x, d=2: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"
    lines = [f"# Cache policies — {record['setup']}", "",
             f"Device: {record['device']}; clock: {record['clock']}; H2D peak {fmt(record['h2d_peak_gb_per_s'])} GB/s "
             f"({record['peak_source']}); {record['tokens']} teacher-forced tokens per run; commit {record['commit']}.",
             "", "| budget | batch | policy | tokens/s | stall ms/token | MB/token | H2D GB/s | hit rate | "
             "prefetch P / R | horizon | perplexity |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {int(r['budget'] * 100)}% ({r['slots_per_layer']}) | {r['batch']} | {r['policy']} | "
                     f"{fmt(r['tokens_per_s'], 1)} | {fmt(r['stall_ms_per_token'], 3)} | {fmt(r['mb_per_token'], 1)} | "
                     f"{fmt(r['h2d_gb_per_s'])} | {fmt(r['hit_rate'], 3)} | {fmt(r['prefetch_precision'])} / "
                     f"{fmt(r['prefetch_recall'])} | {fmt(r['mean_horizon'])} | {fmt(r['perplexity'], 3)} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, out_dir: str, stem: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib to get them)")
        return
    rows = [r for r in record["rows"] if r["policy"] != "resident"]
    cases = sorted({(r["budget"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "stall_ms_per_token", "stall ms/token")):
        names = [p for p in POLICY_ROWS + ["belady (sim)"] if any(r["policy"] == p for r in rows)]
        w = 0.8 / max(len(cases), 1)
        for i, case in enumerate(cases):
            vals = [next((r[key] for r in rows if r["policy"] == n and (r["budget"], r["batch"]) == case), 0)
                    for n in names]
            ax.bar(np.arange(len(names)) + i * w, vals, w, label=f"{int(case[0] * 100)}%, batch {case[1]}")
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names, rotation=30, ha="right")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{stem}.png"), dpi=120)
    print(f"wrote {out_dir}/{stem}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped model)")
    ap.add_argument("--text", default=None, help="evaluation text")
    ap.add_argument("--timing", default=None, help="virtual-clock preset (e.g. h100); default: wall clock")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per run (split over the batch's rows)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="fractions of each layer's experts")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--policies", nargs="+", default=POLICY_ROWS)
    ap.add_argument("--hybrid", default=None, help="a train-hybrid directory: adds the row expertflow+hybrid")
    ap.add_argument("--replay", default=None, help="routing trace .npz to replay on a random DeepSeek-V2-Lite shape")
    ap.add_argument("--replay-layers", type=int, default=4)
    ap.add_argument("--replay-shape", choices=["deepseek-v2-lite", "small"], default="deepseek-v2-lite",
                    help="weights of the replay model; with --timing the numbers depend only on the routing")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny random model, few tokens")
    ap.add_argument("--tolerance-sweep", type=float, nargs="+", default=None,
                    help="instead of the policy table: cache-aware routing at each δ vs exact (quality vs bytes)")
    ap.add_argument("--stem", default=None, help="output file stem (default policies_<setup>)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens = min(args.tokens, 64)
        args.seq_len = min(args.seq_len, 32)
        args.timing = args.timing or "h100"
    timing = get_timing(args.timing)
    model, ids, setup = load_setup(args)
    cfg = model.config
    trace = None
    if args.replay:
        from ef_jax.trace import load_trace
        trace = load_trace(args.replay).experts.astype(np.int32)
        if trace.shape[-1] != cfg.top_k or trace.max() >= cfg.num_experts:
            raise SystemExit(f"trace top-{trace.shape[-1]} over {trace.max() + 1} experts does not fit the model "
                             f"(top-{cfg.top_k} of {cfg.num_experts})")
    device = str(jax.devices()[0].device_kind)
    peak = timing.h2d_bytes_per_s if timing else measure_h2d_peak(4 << 20 if args.tiny else 256 << 20)
    print(f"{setup}; device {device}; clock {'virtual ' + args.timing if timing else 'wall'}; "
          f"H2D peak {peak / 1e9:.2f} GB/s")
    if args.tolerance_sweep:
        rec = {"setup": setup, "device": device, "clock": "virtual " + args.timing if timing else "wall",
               "tokens": args.tokens, "commit": git_commit(), **tolerance_sweep(model, ids, args, args.timing)}
        write_results(args.out, args.stem or "policies_tolerance", rec, sweep_markdown(rec))
        return 0
    rows = []
    for frac in args.budgets:
        slots = min(cfg.num_experts, max(cfg.top_k, round(frac * cfg.num_experts)))
        args._frac = frac
        for batch in args.batches:
            override = trace_override(trace, batch) if trace is not None else None
            lru_routing = None
            for name in args.policies:
                if name == "expertflow+hybrid" and not args.hybrid:
                    print(f"  {name}: needs --hybrid DIR, skipped")
                    continue
                if name == "expertflow+cache-aware" and override is not None:
                    # the replayed routes come from the trace, the router scores from random weights: swapping
                    # experts by those scores would measure nothing about the real model
                    print(f"  {name}: meaningless with --replay (router scores of random weights), skipped")
                    continue
                if name not in ("resident", "expertflow+cache-aware", "expertflow+hybrid") and name not in POLICIES:
                    print(f"  {name}: not registered, skipped")
                    continue
                out = run_row(model, ids, name, slots, batch, args, args.timing, override)
                if out is None:
                    continue
                row, r = out
                rows.append(row)
                if name == "lru":
                    lru_routing = r.routing
                print(f"  {int(frac * 100)}% ({slots} slots) batch {batch} {name:24s} {row['tokens_per_s']:9.1f} tok/s "
                      f"stall {row['stall_ms_per_token']:8.3f} ms/tok {row['mb_per_token']:8.1f} MB/tok "
                      f"hit {row['hit_rate']:.3f}", flush=True)
            bel = belady_row(lru_routing, slots, batch, cfg.num_experts, timing, frac) if lru_routing is not None else None
            if bel is not None:
                rows.append(bel)
    record = {"setup": setup, "device": device, "clock": "virtual " + args.timing if timing else "wall",
              "timing": dataclasses.asdict(timing) if timing else None, "h2d_peak_gb_per_s": peak / 1e9,
              "peak_source": "timing preset" if timing else "measured in this run", "tokens": args.tokens,
              "model": cfg.describe(), "commit": git_commit(), "host": platform.node(), "rows": rows}
    stem = args.stem or ("policies_tiny" if args.tiny else "policies_" + ("replay" if args.replay else "model"))
    write_results(args.out, stem, record, markdown(record))
    plot(record, args.out, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
