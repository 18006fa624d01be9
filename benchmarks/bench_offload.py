"""Offloaded decoding vs all-resident, in one run: tokens/s, stall per token, achieved H2D GB/s vs measured peak.

Random-weight models with real expert shapes (ef_jax.random_model.presets), budgets as a fraction of all experts,
policies nocache / lru (+ resident), batch 1 and 8. Burn-in generation first (compiles), then timed runs; the
median of --repeats. Writes JSON + a markdown table to benchmarks/results/.

  python benchmarks/bench_offload.py                   # GPU: deepseek-v2-lite, olmoe, mixtral shapes
  python benchmarks/bench_offload.py --tiny --out DIR  # CPU smoke mode (what the test runs)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

import ef_jax
from ef_jax.engine.sources.experts import drop_resident
from ef_jax.random_model import presets, random_model, with_layers
from results_io import git_commit, write_results


def measure_h2d_peak(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Pinned host → device bandwidth (bytes/s), median of `repeats` copies of one `nbytes` buffer."""
    dev = jax.devices()[0]
    host = jax.device_put(np.ones(nbytes // 4, np.float32),
                          jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
    dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    jax.device_put(host, dst).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.device_put(host, dst).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def run_case(model, prompts, new_tokens, offload, repeats):
    ef_jax.generate(model, prompts, max_new_tokens=new_tokens, offload=offload)  # burn-in: compile + warm
    runs = [ef_jax.generate(model, prompts, max_new_tokens=new_tokens, offload=offload) for _ in range(repeats)]
    runs.sort(key=lambda r: r.stats["tokens_per_s"])
    return runs[len(runs) // 2].stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--models", default="deepseek-v2-lite,olmoe,mixtral")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of each random model (all MoE)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--timeline-dir", default=None,
                    help="also record one Perfetto timeline per model (lru, 50%% budget, batch 1) here")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--transfers", default="inline", help="comma-separated OffloadConfig.transfers modes to compare")
    ap.add_argument("--budgets", default="0.25,0.5")
    args = ap.parse_args(argv)
    names = ["tiny"] if args.tiny else args.models.split(",")
    new_tokens, repeats = (4, 1) if args.tiny else (args.new_tokens, args.repeats)
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    peak = measure_h2d_peak(4 << 20 if args.tiny else 256 << 20)
    device = jax.devices()[0].device_kind
    print(f"device {device}; pinned H2D peak {peak / 1e9:.2f} GB/s")
    rows = []
    for name in names:
        if name == "default":  # the shipped trained model (real routing), all its layers
            model = ef_jax.load(dtype=dtype)
            cfg = model.config
        else:
            cfg = with_layers(presets()[name], 2 if args.tiny else args.layers)
            model = random_model(cfg, dtype=dtype)
        per = model.param_bytes()["per_expert"]
        if args.timeline_dir:
            os.makedirs(args.timeline_dir, exist_ok=True)
            slots = max(cfg.top_k, cfg.num_experts // 2)
            path = os.path.join(args.timeline_dir, f"timeline_{name}.json")
            ef_jax.generate(model, [list(range(1, 17))], max_new_tokens=new_tokens,
                            offload=ef_jax.OffloadConfig(slots_per_layer=slots, policy="lru", record_timeline=path))
            print(f"timeline → {path}")
        for batch in map(int, args.batches.split(",")):
            prompts = [[(7 * b + i) % cfg.vocab_size for i in range(16)] for b in range(batch)]
            cases = [("resident", None, 1.0)]
            for frac in map(float, args.budgets.split(",")):
                slots = max(cfg.top_k, int(cfg.num_experts * frac))
                cases += [(pol, ef_jax.OffloadConfig(slots_per_layer=slots, policy=pol, transfers=mode), frac)
                          for pol in ("nocache", "lru") for mode in args.transfers.split(",")]
            for policy, offload, frac in cases:
                s = run_case(model, prompts, new_tokens, offload, repeats)
                decoded = s["generated_tokens"] - batch  # the first token comes from prefill
                row = {"model": name, "batch": batch, "policy": policy, "budget_frac": frac,
                       "transfers": offload.transfers if offload is not None else "-",
                       "per_expert_bytes": per, "tokens_per_s": s["tokens_per_s"], "prefill_s": s["prefill_s"],
                       "decode_s": s["decode_s"]}
                if offload is not None:
                    row.update(hit_rate=s["hit_rate"], stall_ms_per_token=1e3 * s["stall_s"] / max(decoded, 1),
                               h2d_gb_per_s=s["h2d_bytes"] / max(s["h2d_s"] + s["stall_s"], 1e-12) / 1e9,
                               h2d_bytes=s["h2d_bytes"], slots_per_layer=s["slots_per_layer"],
                               expert_bytes_resident=s["expert_bytes_resident"],
                               device_peak_bytes_in_use=s.get("device_peak_bytes_in_use"))
                rows.append(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            drop_resident(model)  # the offloaded rows must not also hold every expert on the device
    meta = {"device": device, "backend": jax.default_backend(), "jax": jax.__version__, "dtype": dtype,
            "h2d_peak_gb_per_s": peak / 1e9, "commit": git_commit(), "host": platform.node(),
            "new_tokens": new_tokens, "repeats": repeats, "layers": 2 if args.tiny else args.layers}
    md = (f"# bench_offload — {device}, jax {jax.__version__}, {dtype}, commit {meta['commit']}\n\n"
          f"Pinned H2D peak (measured): {peak / 1e9:.2f} GB/s. {meta['layers']} MoE layers, "
          f"{new_tokens} new tokens, median of {repeats}.\n\n"
          "| model | batch | policy | copies | budget | tokens/s | hit rate | stall ms/token | H2D GB/s |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['model']} | {r['batch']} | {r['policy']} | {r['transfers']} | {r['budget_frac']:.0%} | "
               f"{r['tokens_per_s']:.1f} | "
               f"{r.get('hit_rate', 1.0):.3f} | {r.get('stall_ms_per_token', 0.0):.2f} | "
               f"{r.get('h2d_gb_per_s', 0.0):.2f} |\n")
    tag = "tiny" if args.tiny else device.replace(" ", "_")
    write_results(args.out, f"offload_{tag}", {"meta": meta, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
