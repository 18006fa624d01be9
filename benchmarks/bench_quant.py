"""Quantized experts on the shipped default model: quality per dtype / method / group size, bytes, hit rate, load time.

  python benchmarks/bench_quant.py                 # the README table → benchmarks/results/quant_default_model.{json,md}
  python benchmarks/bench_quant.py --tiny          # seconds: a smoke run (tests)

[held-out text of the 3 domains (benchmarks/data/default_model_*.npz token strings)] → windows of 256 tokens
  → teacher-forced logits, float32, unquantized experts (the reference: the checkpoint is bf16, so these *are* the
    bf16 expert weights, computed in f32) vs each quantized variant → perplexity, its relative cost, greedy (argmax)
    agreement with the reference
[bytes]     bytes per expert (codes + float16 scales/offsets) / bf16 bytes, default model and DeepSeek-V2-Lite shape
[hit rate]  teacher-forced decoding through the offload engine (lru) at one expert_memory for bf16 / int8 / int4
[load]      ef_jax.load(safetensors, expert_dtype=...) vs ef_jax.load(converted store)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ef_jax  # noqa: E402
from benchmarks.results_io import git_commit, write_results  # noqa: E402
from ef_jax.quant.codes import QuantSpec, quantized_nbytes  # noqa: E402
from ef_jax.engine.transfer.store import store_for
from ef_jax.engine.sources.experts import drop_resident

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DOMAINS = ("shakespeare", "kjv", "python")
WINDOW = 256
VARIANTS = [(bits, method, sym) for bits in (8, 4) for method, sym in (("rtn", True), ("rtn", False), ("hqq", False))]


def heldout_ids(model, tokens_per_domain: int) -> dict[str, np.ndarray]:
    """Held-out token ids per domain, from the routing traces' token strings (the card's held-out streams)."""
    from ef_jax.sim.trace import load_trace
    out = {}
    for d in DOMAINS:
        strings = load_trace(os.path.join(DATA, f"default_model_{d}.npz")).token_strings()[:tokens_per_domain]
        out[d] = np.asarray(model.tokenizer.convert_tokens_to_ids(strings), np.int32)
    return out


def teacher_forced(model, ids: dict[str, np.ndarray], window: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """domain → (nll f64[n], argmax i32[n]) over windows of `window` tokens."""
    out = {}
    for d, stream in ids.items():
        n = len(stream) // window
        x = stream[:n * window].reshape(n, window)
        nll, am = [], []
        for i in range(0, n, 8):
            logits = ef_jax.logits(model, x[i:i + 8]).astype(np.float64)    # [b, T, V]
            z = logits - logits.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            tgt = x[i:i + 8, 1:]
            nll.append(-np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0].ravel())
            am.append(logits[:, :-1].argmax(-1).ravel())
        out[d] = (np.concatenate(nll), np.concatenate(am))
    return out


def quality(path, ids, groups, window) -> list[dict]:
    ref = teacher_forced(ef_jax.load(path, dtype="float32"), ids, window)
    all_ref = np.concatenate([ref[d][0] for d in ids])
    rows = [{"expert_dtype": "bf16", "method": "-", "symmetric": None, "group_size": None,
             "perplexity": math.exp(all_ref.mean()), "cost": 0.0, "agreement": 1.0,
             **{f"ppl_{d}": math.exp(ref[d][0].mean()) for d in ids}}]
    print(f"reference (bf16 weights, f32 compute): perplexity {rows[0]['perplexity']:.4f}")
    for g in groups:
        for bits, method, sym in VARIANTS:
            spec = QuantSpec(bits, g, method, sym)
            t = time.perf_counter()
            model = ef_jax.load(path, dtype="float32", expert_dtype=spec)
            load_s = time.perf_counter() - t
            got = teacher_forced(model, ids, window)
            nll = np.concatenate([got[d][0] for d in ids])
            agree = np.concatenate([got[d][1] == ref[d][1] for d in ids]).mean()
            ppl = math.exp(nll.mean())
            row = {"expert_dtype": f"int{bits}", "method": method, "symmetric": sym, "group_size": g,
                   "perplexity": ppl, "cost": ppl / rows[0]["perplexity"] - 1, "agreement": float(agree),
                   "bytes_ratio": model.param_bytes()["per_expert"] / (model.config.expert_params() * 2),
                   "load_s": load_s, **{f"ppl_{d}": math.exp(got[d][0].mean()) for d in ids}}
            rows.append(row)
            print(f"int{bits} {method:3s} {'sym ' if sym else 'asym'} G={g:3d}: perplexity {ppl:.4f} "
                  f"({100 * row['cost']:+.3f} %), agreement {agree:.4f}, bytes {row['bytes_ratio']:.3f}× bf16", flush=True)
    return rows


def bytes_table(groups) -> list[dict]:
    """Bytes per expert / bf16 bytes for the default spec of each dtype, default model and DeepSeek-V2-Lite."""
    from ef_jax.quant.codes import spec_for
    rows = []
    for name, D, F in (("default model", 192, 64), ("DeepSeek-V2-Lite", 2048, 1408)):
        for dt in ("int8", "int4"):
            for g in groups:
                base = spec_for(dt, g, "bfloat16")
                spec = QuantSpec(base.bits, min(g, D, F), base.method, base.symmetric)
                q = 2 * quantized_nbytes(D, F, spec) + quantized_nbytes(F, D, spec)
                rows.append({"model": name, "expert_dtype": dt, "group_size": g, "method": spec.method,
                             "bytes": q, "bf16_bytes": 3 * D * F * 2, "ratio": q / (3 * D * F * 2)})
    return rows


def hit_rates(path, ids, tokens: int, budget_fraction: float) -> list[dict]:
    """lru through the offload engine, one row, the same expert_memory for every expert dtype."""
    from ef_jax.evalpolicy.harness import evaluate_policy
    stream = np.concatenate([ids[d][:tokens // len(ids)] for d in ids]).tolist()
    rows = []
    budget = None
    for dt in ("bf16", "int8", "int4"):
        model = ef_jax.load(path, dtype="bfloat16", expert_dtype=None if dt == "bf16" else dt)
        per = store_for(model).bytes_per_expert
        cfg = model.config
        if budget is None:
            budget = int(budget_fraction * per * cfg.num_experts * cfg.num_moe_layers)
        r = evaluate_policy(model, stream, ef_jax.OffloadConfig(expert_memory=budget, policy="lru"),
                            seq_len=len(stream))
        rows.append({"expert_dtype": dt, "expert_memory": budget, "bytes_per_expert": per,
                     "slots_per_layer": r.stats["slots_per_layer"], "hit_rate": r.hit_rate,
                     "bytes_per_token": r.bytes_per_token, "tokens": r.tokens})
        print(f"{dt}: {per} B/expert, {rows[-1]['slots_per_layer']} slots/layer at {budget / 2**20:.2f} MiB → hit rate "
              f"{r.hit_rate:.3f}, {r.bytes_per_token / 1e3:.1f} kB/token", flush=True)
        drop_resident(model)
    return rows


def load_times(path, expert_dtype: str, repeats: int) -> dict:
    from ef_jax.quant.store import convert
    ef_jax.load(path, expert_dtype=expert_dtype)  # warm imports / first-use costs
    best = lambda f: min(_timed(f) for _ in range(repeats))
    out = {"expert_dtype": expert_dtype,
           "safetensors_float_s": best(lambda: ef_jax.load(path, dtype="bfloat16")),
           "safetensors_quantize_s": best(lambda: ef_jax.load(path, dtype="bfloat16", expert_dtype=expert_dtype))}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        out["convert_s"] = _timed(lambda: convert(path, store, expert_dtype=expert_dtype, dtype="bfloat16"))
        out["store_s"] = best(lambda: ef_jax.load(store))
    print(f"load {expert_dtype}: safetensors + quantize {out['safetensors_quantize_s']:.2f} s, converted store "
          f"{out['store_s']:.2f} s (bf16 safetensors {out['safetensors_float_s']:.2f} s; convert {out['convert_s']:.2f} s)")
    return out


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def markdown(rec: dict) -> str:
    q = rec["quality"]
    lines = [f"# Quantized experts on the default model (commit {rec['commit']})", "",
             f"Teacher-forced perplexity on held-out text ({rec['tokens_per_domain']} tokens × {len(DOMAINS)} domains, "
             f"windows of {rec['window']}), float32 compute. Reference: the checkpoint's bf16 expert weights. "
             "Agreement: fraction of positions whose argmax (greedy) token equals the reference's.", "",
             "| experts | method | group | perplexity | cost | greedy agreement | bytes / bf16 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in q:
        meth = r["method"] if r["method"] != "rtn" else f"rtn-{'sym' if r['symmetric'] else 'asym'}"
        lines.append(f"| {r['expert_dtype']} | {meth} | {r['group_size'] or '-'} | {r['perplexity']:.4f} | "
                     f"{100 * r['cost']:+.3f} % | {r['agreement']:.4f} | {r.get('bytes_ratio', 1.0):.3f} |")
    lines += ["", "Bytes per expert (the default method of each dtype) against bf16:", "",
              "| model | experts | group | bytes | ratio |", "|---|---|---:|---:|---:|"]
    for r in rec["bytes"]:
        lines.append(f"| {r['model']} | {r['expert_dtype']} | {r['group_size']} | {r['bytes']:,} | {r['ratio']:.3f} |")
    if rec.get("hit_rate"):
        h = rec["hit_rate"]
        lines += ["", f"Hit rate at the same expert_memory ({h[0]['expert_memory'] / 2**20:.2f} MiB, lru, "
                      f"{h[0]['tokens']} tokens decoded one at a time through the offload engine):", "",
                  "| experts | bytes / expert | slots / layer | hit rate | H2D kB / token |", "|---|---:|---:|---:|---:|"]
        for r in h:
            lines.append(f"| {r['expert_dtype']} | {r['bytes_per_expert']:,} | {r['slots_per_layer']} | "
                         f"{r['hit_rate']:.3f} | {r['bytes_per_token'] / 1e3:.1f} |")
    if rec.get("load"):
        lt = rec["load"]
        lines += ["", f"Load time (best of {rec['repeats']}, this machine): safetensors bf16 "
                      f"{lt['safetensors_float_s']:.2f} s; safetensors + {lt['expert_dtype']} quantization "
                      f"{lt['safetensors_quantize_s']:.2f} s; converted {lt['expert_dtype']} store "
                      f"{lt['store_s']:.2f} s (writing it: {lt['convert_s']:.2f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped default model)")
    ap.add_argument("--tokens-per-domain", type=int, default=4096)
    ap.add_argument("--groups", default="32,64,192", help="group sizes (a size ≥ an axis means the whole axis)")
    ap.add_argument("--hit-tokens", type=int, default=768, help="tokens decoded for the hit-rate comparison")
    ap.add_argument("--budget-fraction", type=float, default=0.25, help="expert_memory as a fraction of bf16 experts")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--stem", default="quant_default_model")
    args = ap.parse_args(argv)
    path = args.model or ef_jax.model.DEFAULT_MODEL_DIR
    groups = [int(g) for g in args.groups.split(",")]
    tokens, window, hit_tokens, repeats = args.tokens_per_domain, WINDOW, args.hit_tokens, 3
    if args.tiny:
        tokens, window, hit_tokens, repeats, groups = 64, 32, 24, 1, groups[:1]
        global VARIANTS
        VARIANTS = VARIANTS[:1] + VARIANTS[-1:]
    ids = heldout_ids(ef_jax.load(path), tokens)
    rec = {"commit": git_commit(), "model": path, "tokens_per_domain": tokens, "window": window, "repeats": repeats,
           "quality": quality(path, ids, groups, window), "bytes": bytes_table([32, 64, 128]),
           "hit_rate": hit_rates(path, ids, hit_tokens, args.budget_fraction),
           "load": load_times(path, "int4", repeats)}
    write_results(args.out, args.stem + ("_tiny" if args.tiny else ""), rec, markdown(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
