"""Expert-slot FFN: Pallas kernel vs take+einsum vs ragged_dot, against measured HBM bandwidth and FLOP peaks.

Shapes of public MoE checkpoints, T ∈ {1, 4, 16, 256, 2048}; burn-in, block_until_ready, median of --repeats.
Decode (T ≤ 16) is reported as achieved HBM GB/s (bytes = distinct slots × 3·D·F·itemsize), prefill as TFLOP/s
(6·T·K·D·F). Writes JSON + markdown to benchmarks/results/expert_ffn_<device>.{json,md}.

  python benchmarks/bench_expert_ffn.py                   # on a GPU
  python benchmarks/bench_expert_ffn.py --tiny --out DIR  # CPU smoke mode (interpret=True), what the test runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import expert_ffn, expert_ffn_reference
from results_io import git_commit, write_results

SHAPES = {  # name: (D, F, K, S)
    "deepseek-v2-lite": (2048, 1408, 6, 64),
    "qwen3-30b-a3b": (2048, 768, 8, 128),
    "olmoe": (2048, 1024, 8, 64),
    "mixtral": (4096, 14336, 2, 8),
}
TOKENS = (1, 4, 16, 256, 2048)


def ragged_dot_ffn(x, slot_ids, weights, w_gate, w_up, w_down):
    """Sort (token, slot) pairs by slot, then jax.lax.ragged_dot grouped matmuls (the XLA baseline)."""
    T, K = slot_ids.shape
    flat = slot_ids.reshape(-1)
    order = jnp.argsort(flat)
    xs = x[order // K]
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    y = jax.lax.ragged_dot(h, w_down, sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((T, x.shape[1]), jnp.float32).at[order // K].add(y).astype(x.dtype)


def timeit(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # burn-in (compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hbm_peak(nbytes: int, repeats: int) -> float:
    """Device copy bandwidth (read + write bytes per second) of an nbytes buffer."""
    a = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    return 2 * nbytes / timeit(copy, (a,), repeats)


def flop_peak(n: int, dtype, repeats: int) -> float:
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda p, q: p @ q)
    return 2 * n ** 3 / timeit(mm, (a, a), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    interpret = args.tiny or jax.default_backend() == "cpu"
    shapes = {"tiny": (32, 64, 2, 6)} if args.tiny else SHAPES
    tokens = (1, 24) if args.tiny else TOKENS
    repeats = 2 if args.tiny else args.repeats
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    device = jax.devices()[0].device_kind
    hbm = hbm_peak(1 << 20 if args.tiny else 1 << 30, repeats)
    flops = flop_peak(128 if args.tiny else 8192, dtype, repeats)
    print(f"device {device}: HBM copy {hbm / 1e9:.1f} GB/s, matmul {flops / 1e12:.2f} TFLOP/s")
    impls = {"pallas": jax.jit(lambda *a: expert_ffn(*a, interpret=interpret)),
             "take_einsum": jax.jit(expert_ffn_reference), "ragged_dot": jax.jit(ragged_dot_ffn)}
    rows = []
    rs = np.random.RandomState(0)
    for name, (D, F, K, S) in shapes.items():
        pools = [jnp.asarray(rs.randn(*s) * 0.02, dtype) for s in ((S, D, F), (S, D, F), (S, F, D))]
        for T in tokens:
            x = jnp.asarray(rs.randn(T, D), dtype)
            slot_ids = jnp.asarray(np.stack([rs.choice(S, K, replace=False) for _ in range(T)]), jnp.int32)
            w = jnp.asarray(rs.rand(T, K), jnp.float32)
            distinct = len(np.unique(np.asarray(slot_ids)))
            weight_bytes = distinct * 3 * D * F * jnp.dtype(dtype).itemsize
            for impl, fn in impls.items():
                t = timeit(fn, (x, slot_ids, w, *pools), repeats)
                row = {"shape": name, "D": D, "F": F, "K": K, "S": S, "T": T, "impl": impl, "median_s": t,
                       "hbm_gb_per_s": weight_bytes / t / 1e9, "tflop_per_s": 6 * T * K * D * F / t / 1e12}
                rows.append(row)
                print(f"{name:18s} T={T:5d} {impl:12s} {t * 1e3:9.3f} ms  {row['hbm_gb_per_s']:8.1f} GB/s  "
                      f"{row['tflop_per_s']:7.2f} TFLOP/s")
    commit = git_commit()
    meta = {"device": device, "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "interpret": interpret,
            "hbm_peak_gb_per_s": hbm / 1e9, "matmul_peak_tflop_per_s": flops / 1e12, "commit": commit,
            "repeats": repeats}
    md = (f"# expert_ffn — {device}, jax {jax.__version__}, {meta['dtype']}, commit {commit}\n\n"
          f"Measured peaks: HBM copy {hbm / 1e9:.1f} GB/s, matmul {flops / 1e12:.2f} TFLOP/s. "
          f"Median of {repeats}{' (Pallas interpret mode: not a speed figure)' if interpret else ''}.\n\n"
          "| shape | T | impl | ms | HBM GB/s | TFLOP/s |\n|---|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['shape']} | {r['T']} | {r['impl']} | {r['median_s'] * 1e3:.3f} | "
               f"{r['hbm_gb_per_s']:.1f} | {r['tflop_per_s']:.2f} |\n")
    tag = "tiny" if args.tiny else device.replace(" ", "_")
    write_results(args.out, f"expert_ffn_{tag}", {"meta": meta, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
