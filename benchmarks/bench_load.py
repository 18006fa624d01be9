"""Host memory and time of loading and running MoE checkpoints of real expert shapes (issue 24).

For each shape: a random checkpoint (ef_jax.random_checkpoint.write: HF names, sharded safetensors,
bf16) is written to a temporary directory, then each case runs as its own child process — the command a user types —
under /usr/bin/time (peak RSS, wall seconds), and the checkpoint is deleted:

  ef-jax generate --model DIR --expert-memory 1GiB --prompt-ids "1 2 3" --max-new-tokens 8 [case flags] --json
  ef-jax info DIR --expert-memory 1GiB

Cases: bf16 (--dtype bfloat16) and float32 compute (the CPU default), layer mode and --step device; int8 / int4
quantized at load (cold: an empty quantization cache; warm: the second run reads it). Reported: peak RSS, peak RSS /
size on disk, the issue's bound (1.25 × disk + budget + 1 GiB; 2 × for float32 compute), wall seconds and disk GB/s
(size on disk / wall). Results: benchmarks/results/load_<device>.{json,md} (device, jax version, shapes, commit).

  python benchmarks/bench_load.py                                  # DeepSeek-V2-Lite, ~3.3 GB (issue 24's check)
  python benchmarks/bench_load.py --shapes deepseek-v2-lite mixtral qwen3-30b-a3b --moe-layers 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
BUDGET = "1GiB"
CASES = {  # name → (generate flags, bound factor on disk size, expected to meet the bound)
    "bf16 layer": (["--dtype", "bfloat16"], 1.25),
    "bf16 device step": (["--dtype", "bfloat16", "--step", "device"], 1.25),
    "bf16 layer mapped": (["--dtype", "bfloat16", "--host-memory", "mapped"], 1.25),
    "float32 layer": ([], 2.0),
    "float32 device step": (["--step", "device"], 2.0),
    "int8 layer (cold cache)": (["--expert-dtype", "int8"], 1.25),
    "int4 layer (cold cache)": (["--expert-dtype", "int4"], 1.25),
    "int4 layer (warm cache)": (["--expert-dtype", "int4"], 1.25),
    "int4 device step (warm cache)": (["--expert-dtype", "int4", "--step", "device"], 1.25),
}


def _timed(cmd: list[str], env: dict) -> dict:
    """Runs cmd under /usr/bin/time -v: wall seconds, peak RSS bytes, exit code, stdout tail."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    rss = next((int(line.split()[-1]) * 1024 for line in r.stderr.splitlines()
                if "Maximum resident set size" in line), None)
    return {"rc": r.returncode, "wall_s": wall, "peak_rss": rss, "stdout": r.stdout[-4000:],
            "stderr": "\n".join(line for line in r.stderr.splitlines() if "\t" not in line)[-2000:]}


def _stats(stdout: str) -> dict:
    try:
        out = json.loads(stdout.strip().splitlines()[-1])
        s = out.get("stats", {})
    except (ValueError, IndexError, AttributeError):
        return {}
    # the tokens too: a memory change must not change them (compare the rows of two runs)
    return {"tokens": out.get("tokens"),
            **{k: s.get(k) for k in ("host_bytes_pinned", "host_bytes_mapped", "slots_per_layer", "bytes_per_expert")}}


def run_shape(shape: str, moe_layers: int, cases: list[str], work: str) -> dict:
    from ef_jax import random_checkpoint
    dense = random_checkpoint.REAL[shape].get("first_k_dense_replace", 0)
    hf = random_checkpoint.hf_config(shape, dense + moe_layers)
    ckpt = os.path.join(work, shape)
    t0 = time.perf_counter()
    files = random_checkpoint.write(ckpt, hf, shard_bytes=GiB)
    disk = sum(os.path.getsize(os.path.join(ckpt, f)) for f in files)
    print(f"{shape}: wrote {disk / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               EF_JAX_CACHE_DIR=os.path.join(work, "cache"))
    env.pop("XLA_FLAGS", None)
    gen = [sys.executable, "-m", "ef_jax.cli", "generate", "--model", ckpt, "--expert-memory", BUDGET,
           "--prompt-ids", "1 2 3", "--max-new-tokens", "8", "--json"]
    rows = []
    try:
        for name in cases:
            flags, factor = CASES[name]
            r = _timed(gen + flags, env)
            bound = factor * disk + GiB + GiB
            rows.append({"case": name, "flags": flags, "rc": r["rc"], "wall_s": round(r["wall_s"], 1),
                         "peak_rss": r["peak_rss"], "rss_over_disk": r["peak_rss"] / disk if r["peak_rss"] else None,
                         "bound": int(bound), "within_bound": bool(r["peak_rss"] and r["peak_rss"] <= bound),
                         "disk_GBps": disk / 1e9 / r["wall_s"], **_stats(r["stdout"]),
                         **({"error": r["stderr"]} if r["rc"] else {})})
            print(f"  {name}: rc {r['rc']}, {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / GiB:.2f} GiB "
                  f"({rows[-1]['rss_over_disk']:.2f}× disk; bound {bound / GiB:.2f} GiB)", flush=True)
        r = _timed([sys.executable, "-m", "ef_jax.cli", "info", ckpt, "--expert-memory", BUDGET], env)
        rows.append({"case": "info", "rc": r["rc"], "wall_s": round(r["wall_s"], 2), "peak_rss": r["peak_rss"],
                     "within_bound": r["wall_s"] <= 5 and r["peak_rss"] <= 600 * 2**20})
        print(f"  info: {r['wall_s']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
    return {"shape": shape, "config": hf, "disk_bytes": disk, "budget": BUDGET, "rows": rows}


def _markdown(record: dict) -> str:
    lines = [f"# Load benchmark ({record['device']}, jax {record['jax']}, commit {record['commit']})", "",
             f"{record['note']}", ""]
    for s in record["shapes"]:
        lines += [f"## {s['shape']}: {s['config']['num_hidden_layers']} layers, {s['disk_bytes'] / 1e9:.2f} GB on disk, "
                  f"budget {s['budget']}", "",
                  "| case | peak RSS | × disk | bound | within | wall s | disk GB/s | host pinned |",
                  "|---|---:|---:|---:|:-:|---:|---:|---:|"]
        for r in s["rows"]:
            if r["case"] == "info":
                lines.append(f"| info | {r['peak_rss'] / 2**20:.0f} MiB | | 5 s, 600 MiB | "
                             f"{'yes' if r['within_bound'] else 'NO'} | {r['wall_s']:.2f} | | |")
                continue
            pinned = r.get("host_bytes_pinned")
            lines.append(f"| {r['case']} | {r['peak_rss'] / GiB:.2f} GiB | {r['rss_over_disk']:.2f} | "
                         f"{r['bound'] / GiB:.2f} GiB | {'yes' if r['within_bound'] else 'NO'}"
                         f"{'' if r['rc'] == 0 else ' (rc ' + str(r['rc']) + ')'} | {r['wall_s']:.1f} | "
                         f"{r['disk_GBps']:.3f} | {'' if pinned is None else f'{pinned / GiB:.2f} GiB'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["deepseek-v2-lite"])
    ap.add_argument("--moe-layers", type=int, default=2, help="MoE layers per checkpoint (DeepSeek adds 1 dense)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--work", default=None, help="where checkpoints are written (default: a temporary directory)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--note", default="", help="a line for the record (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    import jax
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else f"cpu ({os.cpu_count()} cores)"
    work = tempfile.mkdtemp(prefix="bench_load-", dir=args.work)
    try:
        shapes = [run_shape(s, args.moe_layers, args.cases, work) for s in args.shapes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"device": device, "host": platform.node(), "jax": jax.__version__, "commit": commit,
              "note": args.note, "budget": BUDGET, "shapes": shapes}
    os.makedirs(args.out, exist_ok=True)
    tag = "load_" + device.split(" (")[0].replace(" ", "_")
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, tag + ".md"), "w") as f:
        f.write(_markdown(record))
    print(_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
