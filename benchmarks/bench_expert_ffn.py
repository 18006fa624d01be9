"""Expert-slot FFN: Pallas kernel vs take+einsum vs ragged_dot, against HBM-bandwidth and matmul peaks measured in
the same run.

Shapes of public MoE checkpoints, T ∈ {1, 4, 16, 256, 2048}, bf16; burn-in (compile + one call), then the median of
--repeats calls each ending in block_until_ready. Decode (T ≤ 16) is reported as achieved HBM GB/s with
bytes = distinct selected slots × 3·D·F·itemsize (each slot's weights read once is the floor), prefill as TFLOP/s
with FLOP = 6·T·K·D·F. Writes JSON + markdown to benchmarks/results/expert_ffn_<device>.{json,md}.

  python benchmarks/bench_expert_ffn.py                   # on a GPU
  python benchmarks/bench_expert_ffn.py --tune            # also tune BlockSizes: writes kernels_pallas/tuned.json
  python benchmarks/bench_expert_ffn.py --tiny --out DIR  # CPU smoke mode (interpret=True), what the test runs

--tune times every candidate BlockSizes on this device at each benchmarked T, per shape: the decode candidates
over the decode T's (T ≤ decode_max_tokens), the prefill candidates over the others; the fastest in total of each
regime are merged into one BlockSizes per (D, F) and written to the tuned table (kernels_pallas.tuned_table), keyed
by this device's kind, which kernels_pallas.expert_ffn reads at import. Interpret-mode timings are not a device's:
they go to DIR/tuned_interpret.json (--tuned-out), never into the package's table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import BlockSizes, expert_ffn, expert_ffn_ragged_dot, expert_ffn_reference, tuned_table
from results_io import git_commit, write_results

SHAPES = {  # name: (D, F, K, S)
    "deepseek-v2-lite": (2048, 1408, 6, 64),
    "qwen3-30b-a3b": (2048, 768, 8, 128),
    "olmoe": (2048, 1024, 8, 64),
    "mixtral": (4096, 14336, 2, 8),
}
TOKENS = (1, 4, 16, 256, 2048)
TUNE_DECODE = [BlockSizes(decode_block_f=bf, decode_block_d=bd) for bf in (32, 64, 128) for bd in (128, 256, 512)]
TUNE_PREFILL = [BlockSizes(block_m=bm, block_f=bf, block_d=bd, num_warps=w)
                for bm in (64, 128) for bf in (64, 128) for bd in (64, 128) for w in (4, 8)]
DECODE_FIELDS = ("decode_block_f", "decode_block_d")  # what TUNE_DECODE varies; TUNE_PREFILL varies the rest
PREFILL_FIELDS = ("block_m", "block_f", "block_d", "num_warps")


def timeit(fn, args, repeats: int) -> float:
    """Median seconds per call after a burn-in call (which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hbm_peak(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth of an nbytes buffer: bytes read + written per second."""
    a = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)  # a plain copy may be elided by XLA; +1 keeps it a real read + write
    return 2 * nbytes / timeit(copy, (a,), repeats)


def flop_peak(n: int, dtype, repeats: int) -> float:
    """Dense n×n×n matmul FLOP/s in dtype (the achievable compute peak)."""
    a = jnp.ones((n, n), dtype)
    return 2 * n ** 3 / timeit(jax.jit(lambda p, q: p @ q), (a, a), repeats)


def routing(rs, T: int, K: int, S: int):
    """Each token picks K distinct slots uniformly (as a top-k router over resident experts would)."""
    return jnp.asarray(np.stack([rs.choice(S, K, replace=False) for _ in range(T)]), jnp.int32)


def time_impl(fn, args, repeats: int):
    """(median seconds, None) or (None, error text): one failing implementation must not end a GPU run."""
    try:
        return timeit(fn, args, repeats), None
    except Exception as e:  # noqa: BLE001 — recorded in the results, and printed
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def tune(args, T: int, repeats: int, interpret: bool, candidates) -> dict[BlockSizes, float]:
    """Seconds per call of each candidate BlockSizes that runs at this shape and T (a failing one is left out)."""
    times = {}
    for bs in candidates:
        t, _ = time_impl(jax.jit(lambda *a, bs=bs: expert_ffn(*a, block_sizes=bs, interpret=interpret)), args,
                         repeats)
        if t is not None:
            times[bs] = t
    return times


def best_block_sizes(decode: list[dict], prefill: list[dict]) -> tuple[dict, dict]:
    """decode / prefill: per T of that regime, {candidate: seconds}. The candidate of each regime fastest in total
    over the T's it ran at all of, merged into one set of BlockSizes fields; and the totals (ms) behind it."""
    def fastest(per_t, candidates):
        if not per_t:
            return None, None
        ok = [c for c in candidates if all(c in times for times in per_t)]
        if not ok:
            return None, None
        total = {c: sum(times[c] for times in per_t) for c in ok}
        best = min(ok, key=total.get)
        return best, total[best] * 1e3
    fields, measured = {}, {}
    for per_t, cands, names, regime in ((decode, TUNE_DECODE, DECODE_FIELDS, "decode"),
                                        (prefill, TUNE_PREFILL, PREFILL_FIELDS, "prefill")):
        best, ms = fastest(per_t, cands)
        if best is not None:
            fields.update({n: getattr(best, n) for n in names})
            measured[f"{regime}_ms_total"] = ms
    return fields, measured


def bench_shape(name, shape, tokens, impls, dtype, repeats, max_gather_bytes, hbm, flops, rs, do_tune, interpret):
    D, F, K, S = shape
    item = jnp.dtype(dtype).itemsize
    pools = [jnp.asarray(rs.randn(*s) * 0.02, dtype) for s in ((S, D, F), (S, D, F), (S, F, D))]
    rows = []
    tuned = {True: [], False: []}  # decode regime? → per T, {candidate: seconds}
    for T in tokens:
        slot_ids = routing(rs, T, K, S)
        args = (jnp.asarray(rs.randn(T, D), dtype), slot_ids, jnp.asarray(rs.rand(T, K), jnp.float32), *pools)
        distinct = len(np.unique(np.asarray(slot_ids)))
        weight_bytes, flop = distinct * 3 * D * F * item, 6 * T * K * D * F
        for impl, fn in impls.items():
            if impl == "pallas_atomic" and T > BlockSizes().decode_max_tokens:
                continue  # same prefill kernel as "pallas"
            if impl == "take_einsum" and T * K * 3 * D * F * item > max_gather_bytes:
                t, err = None, f"skipped: gathers {T * K * 3 * D * F * item / 1e9:.0f} GB of weight copies"
            else:
                t, err = time_impl(fn, args, repeats)
            row = {"shape": name, "D": D, "F": F, "K": K, "S": S, "T": T, "distinct_slots": distinct, "impl": impl,
                   "median_s": t, "error": err,
                   "hbm_gb_per_s": weight_bytes / t / 1e9 if t else None,
                   "tflop_per_s": flop / t / 1e12 if t else None}
            row["pct_of_peak"] = (100 * row["hbm_gb_per_s"] / (hbm / 1e9) if T <= 16 else
                                  100 * row["tflop_per_s"] / (flops / 1e12)) if t else None
            rows.append(row)
            print(f"{name:17s} T={T:5d} {impl:12s} " + (f"{t * 1e3:9.3f} ms {row['hbm_gb_per_s']:8.1f} GB/s "
                  f"{row['tflop_per_s']:7.2f} TFLOP/s ({row['pct_of_peak']:.0f}% of peak)" if t else err), flush=True)
        if do_tune:
            decode = T <= BlockSizes().decode_max_tokens
            times = tune(args, T, repeats, interpret, TUNE_DECODE if decode else TUNE_PREFILL)
            tuned[decode].append(times)
            if times:
                bs = min(times, key=times.get)
                rows.append({"shape": name, "D": D, "F": F, "T": T, "impl": "pallas_tuned", "median_s": times[bs],
                             "block_sizes": dataclasses.asdict(bs)})
                print(f"{name:17s} T={T:5d} best BlockSizes {bs} {times[bs] * 1e3:.3f} ms", flush=True)
    return rows, best_block_sizes(tuned[True], tuned[False]) if do_tune else None


def markdown(meta, rows) -> str:
    peak = "Pallas interpret mode: not a speed figure. " if meta["interpret"] else ""
    md = (f"# expert_ffn — {meta['device']}, jax {meta['jax']}, {meta['dtype']}, commit {meta['commit']}\n\n"
          f"Measured in this run: HBM copy {meta['hbm_peak_gb_per_s']:.1f} GB/s, dense matmul "
          f"{meta['matmul_peak_tflop_per_s']:.2f} TFLOP/s. Median of {meta['repeats']} after burn-in. {peak}"
          "% of peak: HBM for T ≤ 16 (bytes = distinct slots × 3·D·F·itemsize), matmul for larger T.\n\n"
          "| shape (D/F/K/S) | T | impl | ms | HBM GB/s | TFLOP/s | % peak |\n|---|---|---|---|---|---|---|\n")
    for r in rows:
        if r["impl"] == "pallas_tuned":
            continue
        if r["median_s"] is None:
            md += f"| {r['shape']} {r['D']}/{r['F']}/{r['K']}/{r['S']} | {r['T']} | {r['impl']} | {r['error']} ||||\n"
            continue
        md += (f"| {r['shape']} {r['D']}/{r['F']}/{r['K']}/{r['S']} | {r['T']} | {r['impl']} | "
               f"{r['median_s'] * 1e3:.3f} | {r['hbm_gb_per_s']:.1f} | {r['tflop_per_s']:.2f} | "
               f"{r['pct_of_peak']:.0f}% |\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, interpret=True: a CPU smoke run")
    ap.add_argument("--tune", action="store_true",
                    help="also tune BlockSizes for the Pallas kernel and write them to the tuned table")
    ap.add_argument("--tuned-out", default=None,
                    help="tuned table to write (default: kernels_pallas/tuned.json on a GPU, "
                         "OUT/tuned_interpret.json in interpret mode)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--max-gather-gb", type=float, default=16.0,
                    help="skip take+einsum where its gathered weight copies exceed this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    interpret = args.tiny or jax.default_backend() == "cpu"
    shapes = {"tiny": (32, 64, 2, 6)} if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    tokens = (1, 24) if args.tiny else tuple(int(t) for t in args.tokens.split(","))
    repeats = 2 if args.tiny else args.repeats
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    device = jax.devices()[0].device_kind
    hbm = hbm_peak(1 << 20 if args.tiny else 1 << 31, repeats)
    flops = flop_peak(128 if args.tiny else 8192, dtype, repeats)
    print(f"device {device}, jax {jax.__version__}: HBM copy {hbm / 1e9:.1f} GB/s, "
          f"matmul {flops / 1e12:.2f} TFLOP/s{' (interpret mode)' if interpret else ''}", flush=True)
    atomic = BlockSizes(decode_combine="atomic")  # only the decode regime reads decode_combine
    impls = {"pallas": jax.jit(lambda *a: expert_ffn(*a, interpret=interpret)),
             "pallas_atomic": jax.jit(lambda *a: expert_ffn(*a, block_sizes=atomic, interpret=interpret)),
             "take_einsum": jax.jit(expert_ffn_reference), "ragged_dot": jax.jit(expert_ffn_ragged_dot)}
    tuned_path = args.tuned_out or (os.path.join(args.out, "tuned_interpret.json") if interpret
                                    else tuned_table.DEFAULT_PATH)
    if interpret and os.path.abspath(tuned_path) == tuned_table.DEFAULT_PATH:
        ap.error("--tuned-out: interpret-mode timings are not a device's; write them elsewhere")
    rs = np.random.RandomState(0)
    rows, found, measured = [], {}, {}
    for name, shape in shapes.items():
        shape_rows, best = bench_shape(name, shape, tokens, impls, dtype, repeats, args.max_gather_gb * 1e9, hbm,
                                       flops, rs, args.tune, interpret)
        rows += shape_rows
        if best is not None and best[0]:
            D, F = shape[:2]
            found[(D, F)] = best[0]
            measured[(D, F)] = {**best[1], "tokens": list(tokens), "dtype": jnp.dtype(dtype).name,
                                "repeats": repeats, "interpret": interpret, "jax": jax.__version__,
                                "commit": git_commit()}
    if found:
        tuned_table.write_entries(tuned_path, device, found, measured)
        print(f"wrote {len(found)} tuned BlockSizes for {device} to {tuned_path}", flush=True)
    meta = {"device": device, "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "interpret": interpret,
            "hbm_peak_gb_per_s": hbm / 1e9, "matmul_peak_tflop_per_s": flops / 1e12, "commit": git_commit(),
            "repeats": repeats, "shapes": {n: dict(zip("DFKS", s)) for n, s in shapes.items()}}
    tag = "tiny" if args.tiny else device.replace(" ", "_")
    write_results(args.out, f"expert_ffn_{tag}", {"meta": meta, "rows": rows}, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
