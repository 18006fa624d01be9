"""ExpertFlow predictive caching on a routing trace: predictor recall, cache policies, token scheduling.

[trace .npz] → prompts split: train (the predictor's) | tune | report
  1. recall@K of the routing-path predictor vs frequency / previous-token / token-lookup / uniform (tune+report)
  2. replay (batch 1) of the report prompts at each slot count, timing preset: nocache, lru, predictive, belady —
     predictive's confidence threshold chosen on the tune prompts (lowest stall), top-K variant shown too
  3. token scheduling (all held-out prompts cut into requests of ≤ --request-tokens): distinct experts per layer and
     step, MB and stall per token, for continuous batching in arrival order vs round robin, the route-aware token
     scheduler and its cache-aware variant (which reads the replayed cache's residency before each step)
→ benchmarks/results/predictor_<name>.{json,md}

    python -m ef_jax.cli train-predictor TRACE --out DIR --max-minutes 12     # once
    python benchmarks/bench_predictor.py --predictor DIR [--trace TRACE] [--name deepseek_v2_lite]
    python benchmarks/bench_predictor.py --predictor DIR --only sched   # redo section 3 in the existing record

Timing presets are models, not measurements (ef_jax.cache.timing.TIMING_PRESETS): stall figures are what the
assumed bandwidth and compute time imply.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import numpy as np

from ef_jax.cache.timing import get_timing
from ef_jax.policies.predictive import Predictive
from ef_jax.predict.baselines import recall_at_k
from ef_jax.predict.evaluate import evaluate, format_table, step_latency, training_trace
from ef_jax.predict.runtime import TrainedPredictor
from ef_jax.predict.train import concat_traces, prompt_slice, trace_digest
from ef_jax.sched import ContinuousScheduler, TokenScheduler, predicted_sets
from ef_jax.sim.batched import replay_batches
from ef_jax.sim.replay import replay
from ef_jax.trace import load_trace
from results_io import git_commit, write_results

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "routing" / "deepseek-v2-lite-puffin-dev.npz"
THRESHOLDS = (None, 0.5, 0.6, 0.7, 0.8, 0.9)   # predicted probability a prefetch needs (None: plain top-K)


def _logit(p: float | None) -> float | None:
    return None if p is None else math.log(p / (1 - p))


def _row(stats, **extra) -> dict:
    d = stats.to_dict()
    return {k: d[k] for k in ("policy", "slots_per_layer", "tokens", "hit_rate", "loads", "bytes_per_token",
                              "stall_per_token_s", "prefetch_issued", "prefetch_wasted") if k in d} | extra


def sim_table(trace, tune_trace, scores, tune_scores, slots, timing, E) -> tuple[list[dict], list[dict]]:
    K = trace.experts.shape[-1]
    rows, sweep = [], []
    for S in slots:
        kw = dict(slots_per_layer=S, timing=timing, num_experts=E)
        best = None
        for p in THRESHOLDS:        # choose the threshold on the tune prompts only
            pol = Predictive(scores=tune_scores, top_k=K, threshold=_logit(p))
            s = replay(tune_trace.experts, policy=pol, **kw)
            sweep.append(_row(s, threshold=p, precision=pol.precision, split="tune"))
            if best is None or s.stall_per_token_s < best[1]:
                best = (p, s.stall_per_token_s)
        for name in ("nocache", "lru"):
            rows.append(_row(replay(trace.experts, policy=name, **kw), label=name))
        for p in dict.fromkeys([None, best[0]]):
            pol = Predictive(scores=scores, top_k=K, threshold=_logit(p))
            label = "predictive (top-K)" if p is None else f"predictive (p > {p})"
            rows.append(_row(replay(trace.experts, policy=pol, **kw), label=label, threshold=p,
                             precision=pol.precision))
        rows.append(_row(replay(trace.experts, policy="belady", **kw), label="belady (offline bound)"))
    return rows, sweep


def chunk_offsets(offsets: np.ndarray, max_len: int) -> np.ndarray:
    """Cut every prompt into requests of at most max_len tokens (more, shorter requests: a serving mix)."""
    out = [0]
    for a, b in zip(offsets[:-1], offsets[1:]):
        out += list(range(int(a) + max_len, int(b), max_len)) + [int(b)]
    return np.array(out, np.int64)


def sched_table(trace, scores, batch_sizes, slots, timing, E, request_tokens) -> list[dict]:
    K = trace.experts.shape[-1]
    offsets = chunk_offsets(trace.offsets, request_tokens)
    sets = predicted_sets(scores, K)
    rows = []
    for B in batch_sizes:
        kw = dict(slots_per_layer=slots, policy="lru", timing=timing, num_experts=E)
        variants = [("arrival order (continuous batching)", ContinuousScheduler(np.zeros((len(offsets) - 1, 1)), B,
                                                                                  route=False), {}),
                    ("round robin, pool 2B", TokenScheduler(B, route=False), dict(sets=sets, pool=2 * B)),
                    ("route-aware, pool 2B", TokenScheduler(B, route=True), dict(sets=sets, pool=2 * B)),
                    ("route + cache-aware, pool 2B", TokenScheduler(B, route=True, cache_aware=True),
                     dict(sets=sets, pool=2 * B))]
        for label, sched, extra in variants:
            s = replay_batches(trace.experts, offsets, sched, **kw, **extra)
            rows.append(s.to_dict() | {"label": label, "B": B, "requests": len(offsets) - 1})
    return rows


def engine_table(model_dir: str, tp: TrainedPredictor, trace, slots, timing, threshold, prompt_tokens: int,
                 new_tokens: int, max_prompts: int) -> list[dict]:  # threshold: {slots: p}
    """Offloaded greedy decoding of the report prompts' first tokens on the real model: tokens vs resident, hits and
    misses for lru and predictive (the trained predictor, step by step), on the virtual `timing` clock."""
    import ef_jax
    from ef_jax import OffloadConfig
    model = ef_jax.load(model_dir)
    tok = model.tokenizer
    names = trace.token_strings()
    prompts = [tok.convert_tokens_to_ids(names[int(a):int(a) + prompt_tokens])
               for a in trace.offsets[:-1][:max_prompts]]
    rows = []
    for S in slots:
        agg = {}
        for label in ("lru", "predictive"):
            tot = {"hits": 0, "misses": 0, "stall_s": 0.0, "h2d_bytes": 0, "same_tokens": True, "tokens": 0}
            for ids in prompts:
                ref = ef_jax.generate(model, [ids], max_new_tokens=new_tokens).tokens
                pol = label if label == "lru" else Predictive(tp.stepper(tok.convert_ids_to_tokens),
                                                              top_k=model.config.top_k,
                                                              threshold=_logit(threshold.get(S)))
                res = ef_jax.generate(model, [ids], max_new_tokens=new_tokens,
                                      offload=OffloadConfig(slots_per_layer=S, policy=pol, timing=timing))
                st = res.stats
                tot["same_tokens"] &= res.tokens == ref
                tot["tokens"] += len(ids) + len(res.tokens[0])
                for k in ("hits", "misses", "stall_s", "h2d_bytes"):
                    tot[k] += st[k]
            tot["hit_rate"] = tot["hits"] / max(tot["hits"] + tot["misses"], 1)
            agg[label] = tot
            rows.append({"slots_per_layer": S, "label": label, "prompts": len(prompts), **tot})
        print(f"engine S={S}: lru misses {agg['lru']['misses']}, predictive misses {agg['predictive']['misses']}, "
              f"tokens equal resident: {agg['lru']['same_tokens'] and agg['predictive']['same_tokens']}", flush=True)
    return rows


def _split_text(splits: list[dict]) -> str:
    return " ".join(f"`{sp['trace']}`: prompts 0–{sp['train'] - 1} train the predictor, {sp['train']}–{sp['tune'] - 1} "
                    f"tune the policy threshold, {sp['tune']}–{sp['report'] - 1} are reported." for sp in splits)


def markdown(rec: dict) -> str:
    t = rec["timing"]
    pr = rec["predictor"]
    lines = [f"# Routing-path predictor and predictive caching: {rec['name']}", "",
             f"Traces: {rec['layers']} MoE layers, top-{rec['top_k']} of {rec['experts']}. {_split_text(rec['split'])} "
             f"Machine: {rec['machine']}; commit {rec['commit']}.", "",
             f"## Recall@{rec['top_k']} on the held-out prompts ({rec['recall']['tokens']:,} tokens)", "",
             format_table(rec["recall"]), "",
             f"Predictor: {pr['parameters']:,} parameters ({pr['parameters'] * 4 / 2**20:.1f} MiB f32), trained "
             f"{pr['train_minutes']:.1f} min ({pr['train_steps']} steps) on {pr['train_backend']}; step-by-step "
             f"latency {pr['step_latency_ms']:.2f} ms per token at batch 1 ({pr['step_latency_b8_ms']:.2f} ms per "
             f"step of 8) on this machine's CPU, whole-trace scoring {pr['batch_us_per_token']:.0f} µs per token. "
             f"Reading only the last {pr['short_context']} tokens: {pr['step_latency_short_ms']:.2f} ms per token, "
             f"recall@{rec['top_k']} {pr['recall_short_context']:.3f}.", ""]
    if "incremental_latency_ms" in pr:
        lines += [f"Those step latencies re-run the whole window every token. Decoded with a key/value ring "
                  f"(`stepper(incremental=True)`, the default; commit {pr['latency_commit']}): "
                  f"**{pr['incremental_latency_ms']:.2f} ms** per token at batch 1 and "
                  f"{pr['incremental_latency_b8_ms']:.2f} ms per step of 8, against "
                  f"{pr['full_window_latency_ms']:.2f} / {pr['full_window_latency_b8_ms']:.2f} ms re-running the "
                  f"window in the same run (median of 200 steps, this machine's CPU).", ""]
    lines += [
             f"## Cache policies, batch 1, the reported prompts ({rec['sim'][0]['tokens']:,} tokens)", "",
             f"Timing preset `{rec['timing_preset']}` (assumed): {t['h2d_bytes_per_s'] / 1e9:.0f} GB/s host→device, "
             f"{t['expert_bytes']:,} bytes per expert ({t['copy_s'] * 1e3:.3f} ms per copy), "
             f"{t['layer_compute_s'] * 1e3:.2f} ms compute per MoE layer.", "",
             "| slots/layer | policy | hit rate | MB/token H2D | stall ms/token | prefetch precision |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rec["sim"]:
        prec = f"{r['precision']:.3f}" if "precision" in r else "—"
        lines.append(f"| {r['slots_per_layer']} | {r['label']} | {r['hit_rate']:.4f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['stall_per_token_s'] * 1e3:.2f} | {prec} |")
    lines += ["", f"## Token scheduling, LRU with {rec['sched_slots']} slots/layer: all held-out prompts cut into "
              f"{rec['sched'][0]['requests']} requests of ≤ {rec['request_tokens']} tokens", ""]
    if rec.get("sched_commit"):
        lines += [f"Rerun alone (`--only sched`) at commit {rec['sched_commit']}, with a retrained predictor "
                  f"({rec['sched_predictor_steps']} steps, same settings).", ""]
    lines += ["| B | schedule | tokens/step | distinct experts/layer/step | per token | MB/token H2D | "
              "stall ms/token | longest wait (steps) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rec["sched"]:
        lines.append(f"| {r['B']} | {r['label']} | {r['tokens_per_step']:.1f} | {r['distinct_per_layer']:.2f} | "
                     f"{r['distinct_per_token']:.2f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['stall_per_token_s'] * 1e3:.2f} | {r['max_wait']} |")
    if rec.get("engine"):
        e = rec["engine"]
        lines += ["", f"## Engine: offloaded greedy decoding on `{rec['engine_model']}` "
                  f"(virtual `{rec['timing_preset']}` clock), "
                  f"{e[0]['prompts']} report prompts × ({rec['engine_prompt_tokens']} prompt + "
                  f"{rec['engine_new_tokens']} new tokens), predictive thresholds (slots: p) {rec['engine_threshold']} "
                  f"from the tuning prompts", "",
                  "| slots/layer | policy | tokens equal resident | hits | misses | hit rate | stall ms/token |",
                  "|---:|---|---|---:|---:|---:|---:|"]
        for r in e:
            lines.append(f"| {r['slots_per_layer']} | {r['label']} | {'yes' if r['same_tokens'] else 'NO'} | "
                         f"{r['hits']} | {r['misses']} | {r['hit_rate']:.4f} | "
                         f"{r['stall_s'] / max(r['tokens'], 1) * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def _existing_record(args) -> tuple[Path, dict]:
    """The record an --only run updates (it must exist)."""
    path = Path(args.out) / f"predictor_{args.name}.json"
    if not path.exists():
        raise SystemExit(f"--only {args.only} updates {path}, which does not exist: run the full benchmark first")
    rec = json.loads(path.read_text())
    if "engine_threshold" in rec:   # JSON made the slot counts strings
        rec["engine_threshold"] = {int(k): v for k, v in rec["engine_threshold"].items()}
    return path, rec


def _only_latency(args, tp: TrainedPredictor) -> int:
    """Measure the step latency of the incremental and the full-window stepper in one run and add both to the
    existing record."""
    _, rec = _existing_record(args)
    lat = {(inc, b): step_latency(tp, tokens=200, batch=b, incremental=inc)["median_s"] * 1e3
           for inc in (True, False) for b in (1, 8)}
    for (inc, b), ms in lat.items():
        print(f"{'incremental' if inc else 'full window'}, batch {b}: {ms:.2f} ms per step", flush=True)
    rec["predictor"].update(incremental_latency_ms=lat[True, 1], incremental_latency_b8_ms=lat[True, 8],
                            full_window_latency_ms=lat[False, 1], full_window_latency_b8_ms=lat[False, 8],
                            latency_commit=git_commit())
    write_results(args.out, f"predictor_{args.name}", rec, markdown(rec))
    return 0


def _only_sched(args, tp: TrainedPredictor, held, timing, E: int) -> int:
    """Rerun the token-scheduling table and put it into the existing record (which must match the settings)."""
    path, rec = _existing_record(args)
    if rec["timing_preset"] != args.timing:
        raise SystemExit(f"{path} was made with --timing {rec['timing_preset']}, not {args.timing}")
    rec["sched"] = sched_table(held, tp.scores(held), args.batch_sizes, args.sched_slots, timing, E,
                               args.request_tokens)
    rec.update(sched_slots=args.sched_slots, request_tokens=args.request_tokens, sched_commit=git_commit(),
               sched_predictor_steps=(tp.meta.get("history") or [{}])[-1].get("step", 0))
    write_results(args.out, f"predictor_{args.name}", rec, markdown(rec))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", nargs="+", default=[str(DEFAULT_TRACE)],
                    help="routing traces of one model (the predictor's training traces: their held-out prompts "
                         "are used)")
    ap.add_argument("--predictor", required=True, help="an `ef-jax train-predictor --out` directory")
    ap.add_argument("--name", default="deepseek_v2_lite")
    ap.add_argument("--tune-prompts", type=float, default=0.5,
                    help="fraction of the held-out prompts used to tune the policy threshold (default half)")
    ap.add_argument("--slots", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--timing", default="h100")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--sched-slots", type=int, default=32)
    ap.add_argument("--request-tokens", type=int, default=32)
    ap.add_argument("--engine-model", default=None,
                    help="also decode the report prompts through the offload engine with this checkpoint (the model "
                         "the trace was recorded from; 'default' = the shipped model)")
    ap.add_argument("--engine-prompts", type=int, default=6)
    ap.add_argument("--engine-prompt-tokens", type=int, default=32)
    ap.add_argument("--engine-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--only", choices=["sched", "latency"], default=None,
                    help="sched: rerun only the token-scheduling table and replace it in the existing "
                         "predictor_<name>.json/.md (the other sections keep their numbers and commit); latency: "
                         "add the incremental vs full-window step latency to it")
    args = ap.parse_args(argv)
    tp = TrainedPredictor.load(args.predictor)
    traces = [load_trace(p) for p in args.trace]
    splits, parts = [], {"held": [], "tune": [], "report": []}
    for path, t in zip(args.trace, traces):  # the predictor's own split of each trace, found by content
        n_train = next((s["train_prompts"] for s in tp.meta.get("traces", []) if s["digest"] == trace_digest(t)), 0)
        n_tune = n_train + int(round((t.num_prompts - n_train) * args.tune_prompts))
        splits.append({"trace": Path(path).name, "train": n_train, "tune": n_tune, "report": t.num_prompts})
        parts["held"].append(prompt_slice(t, n_train, t.num_prompts))
        parts["tune"].append(prompt_slice(t, n_train, n_tune))
        parts["report"].append(prompt_slice(t, n_tune, t.num_prompts))
    held, tune, report = (concat_traces(parts[k]) for k in ("held", "tune", "report"))
    full = traces[0]
    E, K = tp.cfg.num_experts, full.experts.shape[-1]
    timing = get_timing(args.timing)
    t0 = time.perf_counter()
    if args.only == "sched":
        return _only_sched(args, tp, held, timing, E)
    if args.only == "latency":
        return _only_latency(args, tp)
    recall = evaluate(tp, held, train=training_trace(tp.meta), budgets=[K, 2 * K], num_experts=E)
    print(format_table(recall), flush=True)
    lat1, lat8 = step_latency(tp, batch=1, incremental=False), step_latency(tp, batch=8, incremental=False)
    short = min(32, tp.cfg.window)
    lat_short = step_latency(tp, batch=1, context=short, incremental=False)
    inc1, inc8 = step_latency(tp, tokens=200, batch=1), step_latency(tp, tokens=200, batch=8)
    recall_short = float(recall_at_k(tp.scores(held, context=short), held.experts).mean())
    sim, sweep = sim_table(report, tune, tp.scores(report), tp.scores(tune), args.slots, timing, E)
    for r in sim:
        print(f"S={r['slots_per_layer']} {r['label']}: hit {r['hit_rate']:.4f}, {r['bytes_per_token'] / 1e6:.1f} "
              f"MB/token, stall {r['stall_per_token_s'] * 1e3:.2f} ms/token", flush=True)
    sched = sched_table(held, tp.scores(held), args.batch_sizes, args.sched_slots, timing, E,  # tunes nothing
                        args.request_tokens)
    rec = {"name": args.name, "trace": ", ".join(sp["trace"] for sp in splits), "layers": int(full.experts.shape[1]),
           "top_k": K, "experts": E, "split": splits,
           "machine": f"{platform.machine()} CPU, {jax.default_backend()} backend ({jax.device_count()} device)",
           "commit": git_commit(), "timing_preset": args.timing,
           "timing": {"h2d_bytes_per_s": timing.h2d_bytes_per_s, "expert_bytes": timing.expert_bytes,
                      "layer_compute_s": timing.layer_compute_s, "copy_s": timing.copy_s},
           "predictor": {"dir": str(args.predictor), "config": tp.cfg.to_json(),
                         "parameters": int(sum(x.size for x in jax.tree.leaves(tp.params))),
                         "train_minutes": tp.meta.get("train_minutes", float("nan")),
                         "train_steps": (tp.meta.get("history") or [{}])[-1].get("step", 0),
                         "train_backend": tp.meta.get("jax_backend", "?"),
                         "step_latency_ms": lat1["median_s"] * 1e3, "step_latency_b8_ms": lat8["median_s"] * 1e3,
                         "short_context": short, "step_latency_short_ms": lat_short["median_s"] * 1e3,
                         "recall_short_context": recall_short,
                         "incremental_latency_ms": inc1["median_s"] * 1e3,
                         "incremental_latency_b8_ms": inc8["median_s"] * 1e3,
                         "full_window_latency_ms": lat1["median_s"] * 1e3,
                         "full_window_latency_b8_ms": lat8["median_s"] * 1e3, "latency_commit": git_commit(),
                         "batch_us_per_token": recall["predictor_batch_s_per_token"] * 1e6},
           "recall": recall, "sim": sim, "threshold_sweep": sweep, "sched": sched,
           "sched_slots": args.sched_slots, "request_tokens": args.request_tokens,
           "wall_s": time.perf_counter() - t0}
    if args.engine_model:
        rec["engine_threshold"] = {r["slots_per_layer"]: r["threshold"] for r in sim
                                   if r["label"].startswith("predictive (p")}
        rec["engine_model"] = args.engine_model
        rec["engine_prompt_tokens"], rec["engine_new_tokens"] = args.engine_prompt_tokens, args.engine_new_tokens
        rec["engine"] = engine_table(None if args.engine_model == "default" else args.engine_model, tp, report,
                                     args.slots, timing, rec["engine_threshold"], args.engine_prompt_tokens,
                                     args.engine_new_tokens, args.engine_prompts)
        rec["wall_s"] = time.perf_counter() - t0
    write_results(args.out, f"predictor_{args.name}", rec, markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
