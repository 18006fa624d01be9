"""Host FFN time per expert on this CPU: the jitted CPU-backend expert FFN that host-computed experts run
(ef_jax.engine.programs.host_ffn), for public MoE expert shapes, bf16 / int8 / int4, 1, 4 and 16 tokens.

[random expert in pinned host memory, as the store keeps it] → expert_add on jax.devices("cpu") → burn-in (compile
+ one call), then the min of --repeats calls each ending in block_until_ready → seconds per expert, achieved
GB/s of expert bytes (bytes of the expert as stored / time).

Layouts: "flat" is one buffer per expert as the ExpertStore keeps it today (gate | up | down; XLA on CPU copies
each slice before its matmul), "split" three buffers (gate, up, down; what a store that keeps the matrices apart
would give). Quantized experts are flat u8 buffers, dequantized inside the program.

Writes benchmarks/results/host_experts_<host>.{json,md} and, with --write-preset, the measured rates that
ef_jax.cache.host_compute builds its host presets from (ef_jax/cache/host_rates.json).

  python benchmarks/bench_host_experts.py --write-preset       # the full run (a few minutes on 2 cores)
  python benchmarks/bench_host_experts.py --tiny --out DIR      # smoke mode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import SingleDeviceSharding

from ef_jax.engine.programs.host_ffn import bucket_tokens, expert_add, host_device, quant_layout
from ef_jax.quant import pool as qpool
from ef_jax.quant.codes import _divisor_near, spec_for
from results_io import git_commit, write_results

SHAPES = {  # name: (D, F)
    "default-model": (192, 64),
    "deepseek-v2-lite": (2048, 1408),
    "qwen3-30b-a3b": (2048, 768),
    "mixtral": (4096, 14336),
}
TINY_SHAPES = {"default-model": (192, 64), "tiny": (64, 32)}
DTYPES = ("bf16", "int8", "int4")
TOKENS = (1, 4, 16)
PRESET_SHAPE = "deepseek-v2-lite"  # the host presets are for this expert (the timing presets' expert size)
RATES_PATH = os.path.join(os.path.dirname(__file__), "..", "ef_jax", "cache", "host_rates.json")


def _pinned(a: np.ndarray) -> jax.Array:
    dev = host_device()
    return jax.device_put(a, SingleDeviceSharding(dev, memory_kind="pinned_host"))


def make_expert(D: int, F: int, dtype: str, layout: str, rng) -> tuple[object, tuple | None, int]:
    """A random expert as the host FFN reads it: (buffer(s), quant layout or None, bytes)."""
    if dtype == "bf16":
        mats = [rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16) * 0.02
                for s in ((D, F), (D, F), (F, D))]
        nbytes = sum(m.nbytes for m in mats)
        if layout == "split":
            return tuple(_pinned(m) for m in mats), None, nbytes
        return _pinned(np.concatenate([m.reshape(-1) for m in mats])[None]), None, nbytes  # [1, W], as a store layer
    spec = spec_for(dtype, None, "bfloat16")
    b = spec.bits
    leaves = {}
    for m, (i, o) in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D))):
        G = _divisor_near(i, spec.group_size)  # as the quantizer picks a group dividing the input axis
        leaves[m] = rng.integers(0, 256, (1, i * b // 8, o), dtype=np.uint8)
        leaves[f"{m}_scale"] = (rng.random((1, i // G, o), dtype=np.float32) * 0.01).astype(np.float16)
        leaves[f"{m}_offset"] = None if spec.symmetric else np.zeros((1, i // G, o), np.float16)
    like = qpool.QuantExpertPool(bits=b, **leaves)
    flat = qpool.expert_bytes(like, 0)
    return _pinned(flat[None]), quant_layout(like), flat.nbytes


def time_expert(buf, layout, D: int, F: int, tokens: int, repeats: int, rng) -> float:
    """Min seconds of one host expert call over `tokens` tokens (bf16 activations, as a bf16 model's)."""
    cpu = host_device()
    n = bucket_tokens(tokens)
    x = jax.device_put(rng.standard_normal((tokens, D), dtype=np.float32).astype(ml_dtypes.bfloat16), cpu)
    idx = jax.device_put(np.arange(n, dtype=np.int32) % tokens, cpu)
    w = jax.device_put(np.ones(n, np.float32), cpu)
    run = lambda: expert_add(jnp.zeros((tokens, D), jnp.float32, device=cpu), x, buf, np.int32(0), idx, w,
                             D=D, F=F, layout=layout)
    jax.block_until_ready(run())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t)
    return best


def fit_rates(rows: list[dict], shape: str, dtype: str, layout: str) -> dict:
    """Host FFN rate for one expert (bytes per second at one token) and the extra time per further token as a
    fraction of the one-token time (from the 1- and 16-token times: robust to one noisy middle point)."""
    pick = sorted((r["tokens"], r["seconds"]) for r in rows
                  if r["shape"] == shape and r["dtype"] == dtype and r["layout"] == layout)
    (t0, one), (t1, many) = pick[0], pick[-1]
    slope = (many - one) / (t1 - t0)
    nbytes = next(r["bytes"] for r in rows if r["shape"] == shape and r["dtype"] == dtype and r["layout"] == layout)
    return {"bytes_per_s": nbytes / one, "token_cost": max(slope, 0.0) / one, "expert_bytes": nbytes,
            "seconds": dict((str(int(k)), v) for k, v in pick)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small shapes only (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--write-preset", action="store_true", help=f"write the host preset data to {RATES_PATH}")
    ap.add_argument("--shapes", nargs="*", default=None, help="subset of the shapes")
    ap.add_argument("--merge", action="store_true",
                    help="keep, per row, the faster of this run and the results file already there (a machine "
                         "shared with other jobs: the min over runs is the least disturbed)")
    args = ap.parse_args(argv)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    rng = np.random.default_rng(0)
    rows = []
    for name, (D, F) in shapes.items():
        for dtype in DTYPES:
            for layout in (("flat", "split") if dtype == "bf16" else ("flat",)):
                buf, qlayout, nbytes = make_expert(D, F, dtype, layout, rng)
                for tokens in TOKENS:
                    s = time_expert(buf, qlayout, D, F, tokens, args.repeats, rng)
                    rows.append({"shape": name, "D": D, "F": F, "dtype": dtype, "layout": layout, "tokens": tokens,
                                 "bytes": nbytes, "seconds": s, "gb_per_s": nbytes / s / 1e9})
                    print(f"{name:17s} {dtype:4s} {layout:5s} T={tokens:2d}: {s * 1e3:8.3f} ms  "
                          f"{nbytes / s / 1e9:6.2f} GB/s", flush=True)
                del buf
    stem = "host_experts_tiny" if args.tiny else "host_experts_cpu"
    runs = 1
    old_path = os.path.join(args.out, f"{stem}.json")
    if args.merge and os.path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        key = lambda r: (r["shape"], r["dtype"], r["layout"], r["tokens"])
        best = {key(r): r for r in old["rows"]}
        for r in rows:
            if key(r) not in best or r["seconds"] < best[key(r)]["seconds"]:
                best[key(r)] = r
        rows = list(best.values())
        runs = old.get("runs", 1) + 1
    cores = os.cpu_count()
    record = {"device": "cpu", "host": platform.node(), "processor": platform.processor() or platform.machine(),
              "cores": cores, "jax": jax.__version__, "commit": git_commit(), "repeats": args.repeats,
              "statistic": "min over repeats", "runs": runs, "load_average_at_end": os.getloadavg(),
              "conditions": "measured with other jobs running on the same 2 cores", "rows": rows}
    if PRESET_SHAPE in shapes:
        record["fits"] = {f"{dtype}/{layout}": fit_rates(rows, PRESET_SHAPE, dtype, layout)
                          for dtype, layout in (("bf16", "flat"), ("bf16", "split"), ("int8", "flat"),
                                                ("int4", "flat"))}
    write_results(args.out, stem, record, markdown(record))
    if args.write_preset:
        if PRESET_SHAPE not in shapes:
            raise SystemExit(f"--write-preset needs the {PRESET_SHAPE} shape")
        data = {"measured_on": f"{record['processor']}, {cores} cores, jax {jax.__version__}, commit "
                               f"{record['commit']}, {record['conditions']}",
                "source": "benchmarks/results/host_experts_cpu.json", "cores": cores, "shape": PRESET_SHAPE,
                "fits": record["fits"]}
        with open(RATES_PATH, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {os.path.normpath(RATES_PATH)}")
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Host FFN time per expert (CPU backend), {r['processor']}, {r['cores']} cores, jax {r['jax']}, "
             f"commit {r['commit']}", "",
             f"{r['statistic']} of {r['repeats']} calls (and over {r.get('runs', 1)} runs), each ending in block_until_ready; {r['conditions']}. "
             "GB/s = the expert's stored bytes / time.", "",
             "| shape | D | F | dtype | layout | tokens | ms | GB/s |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['shape']} | {x['D']} | {x['F']} | {x['dtype']} | {x['layout']} | {x['tokens']} | "
                     f"{x['seconds'] * 1e3:.3f} | {x['gb_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
