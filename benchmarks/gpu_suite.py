"""The prepared GPU benchmark suite (issue 13): one command, every part in its own process under one time budget.

  python benchmarks/gpu_suite.py                         # GPU: ≤ 9 minutes, writes benchmarks/results/gpu_suite/
  python benchmarks/gpu_suite.py --only transfer,deepseek --out DIR
  python benchmarks/gpu_suite.py --dry-run --out DIR     # every part with tiny shapes on the CPU (a test runs it)

Parts, in the order they run (the issue's GPU figures first):
  transfer       pinned H2D peak vs size, HBM copy bandwidth, copy/compute overlap issued before / after a compute
                 dispatch, from a thread, and inside one jitted program (pinned_host arguments moved to device and
                 written into a donated pool while the same program computes); copy-start counted in its HLO
  deepseek       full-depth DeepSeek-V2-Lite shapes (26 MoE layers × 64 experts of 17.3 MB, ~28 GB pinned), routing
                 replayed from shared/data/routing when found; 25/50/100 % budgets × nocache/lru/expertflow/
                 predictive × batch 1/8, tokens/s beside the roofline max(compute, misses × copy time); and
                 OffloadConfig(step="device") (issue 14: the whole step in one program) at lru 25/50 %, batch 1,
                 beside the layer mode on the model's own routing
  copiers        OffloadConfig(transfers=inline|thread|program) at lru 50 %, batch 1, same model ("program" is
                 recorded as not available when this build lacks it)
  quant          the same model with bf16 / int8 / int4 experts at one expert_memory (25 % of the bf16 experts),
                 lru, batch 1: tokens/s, bytes per expert, slots, hit rate against bf16, and what
                 expert_memory="auto" would choose on the device (runs after copiers, before the rest of the grid)
  mixtral        Mixtral shapes, 4 layers: resident / nocache / lru / expertflow, batch 1
  hf_accelerate  transformers + accelerate (experts offloaded to CPU) on the same Mixtral shapes → ef_jax/accelerate
  policies       the shipped model's cache policies on the wall clock (bench_policies)
  expert_ffn     the expert-slot FFN kernels vs take+einsum and ragged_dot (bench_expert_ffn)

Each part runs in a child process (`--part NAME`), with a soft deadline it checks before every configuration and a
hard kill 20 s after it; the child writes its record after every row, so a killed or crashed part still leaves what
it measured, and the parent records why it ended. One part failing never stops the others. A part that cannot get
its minimum time before the suite's budget runs out is recorded as skipped, with the reason. The parent imports no
jax; it sets XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (pinned host pool; default 64 GB in XLA) for the children before any
of them imports jax. Output: <out>/<part>.json + .md per part, <out>/<part>.log, and <out>/summary.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):  # this checkout's ef_jax and benchmark modules, in the children too
    if p not in sys.path:
        sys.path.insert(0, p)

from suite_common import Part, fmt, md_header, run_meta, table  # noqa: E402

# name: (child group, nominal seconds on a GPU, minimum seconds to be worth starting)
PARTS = {
    "transfer": ("transfer", 50, 25),
    "deepseek": ("deepseek", 330, 90),  # +60 s quant rows, +50 s device-step rows (estimates, not measured)
    "copiers": ("deepseek", 0, 0),  # runs in the deepseek child (one model build, ~28 GB pinned, serves both)
    "quant": ("deepseek", 0, 0),    # also there: quantizes that model's experts (+15 GB int8, +8 GB int4 pinned)
    "mixtral": ("mixtral", 60, 30),
    "hf_accelerate": ("hf_accelerate", 60, 35),
    "policies": ("policies", 75, 40),
    "expert_ffn": ("expert_ffn", 45, 20),
}
DRY_SECONDS = 600   # each dry-run group's limit: tiny shapes take ~10-60 s, many times that on a loaded 2-core CPU
HARD_KILL_GRACE_S = 20
HOST_MEMORY_LIMIT_GB = "110"  # ≥ 28 GB of DeepSeek-V2-Lite experts + Mixtral's 11 GB, below a 128 GB host


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, every part")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_suite"))
    ap.add_argument("--only", default=None, help="comma-separated parts: " + ",".join(PARTS))
    ap.add_argument("--budget-s", type=float, default=None, help="the whole suite's budget (default 540; dry 3000)")
    ap.add_argument("--routing", default=None, help="routing trace .npz to replay on the DeepSeek shapes")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats of the transfer and kernel parts")
    ap.add_argument("--expert-mib", type=float, default=16.5, help="expert size of the overlap measurement")
    ap.add_argument("--ds-steps-b1", type=int, default=24, help="DeepSeek: decode steps per run at batch 1")
    ap.add_argument("--ds-steps-b8", type=int, default=4, help="DeepSeek: decode steps per run at batch 8")
    ap.add_argument("--mixtral-tokens", type=int, default=16)
    ap.add_argument("--hf-tokens", type=int, default=6)
    ap.add_argument("--policy-tokens", type=int, default=64, help="policies: teacher-forced tokens per run")
    ap.add_argument("--ffn-shapes", default="deepseek-v2-lite,mixtral")
    ap.add_argument("--ffn-tokens", default="1,16,256")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)       # child: which group to run
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # child: epoch seconds
    return ap.parse_args(argv)


# ---- child ------------------------------------------------------------------------------------------------------
def run_child(args) -> int:
    os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", HOST_MEMORY_LIMIT_GB)  # before jax is imported
    names = args.only.split(",")
    parts = {n: Part(n, args.out, args.dry_run, args.deadline, args.budget_s) for n in names}
    try:
        if args.part != "hf_accelerate":  # the torch part must not start a jax client (GPU memory)
            import jax
            if args.dry_run:
                jax.config.update("jax_platforms", "cpu")
            for p in parts.values():
                p.record["meta"] = run_meta()
        run_group(args.part, parts, args)
    except BaseException as e:  # noqa: BLE001 — the record says how the part ended, whatever ended it
        for p in parts.values():
            if p.record["status"] == "running":
                p.finish(e)
        return 1
    for p in parts.values():
        p.finish()
    return 0


def run_group(group: str, parts: dict, args) -> None:
    if group == "transfer":
        from suite_transfer import part_transfer, transfer_markdown
        parts["transfer"].markdown_fn = transfer_markdown
        part_transfer(parts["transfer"], args)
    elif group == "deepseek":
        from suite_models import models_markdown, part_deepseek
        from suite_quant import quant_markdown
        for p in parts.values():
            p.markdown_fn = quant_markdown if p.name == "quant" else models_markdown
        part_deepseek(parts, args)
    elif group == "mixtral":
        from suite_models import models_markdown, part_mixtral
        parts["mixtral"].markdown_fn = models_markdown
        part_mixtral(parts["mixtral"], args)
    elif group == "hf_accelerate":
        from suite_hf import hf_markdown, part_hf
        parts["hf_accelerate"].markdown_fn = hf_markdown
        part_hf(parts["hf_accelerate"], args)
    elif group == "policies":
        from suite_existing import part_policies, policies_markdown
        parts["policies"].markdown_fn = policies_markdown
        part_policies(parts["policies"], args)
    elif group == "expert_ffn":
        from suite_existing import ffn_markdown, part_expert_ffn
        parts["expert_ffn"].markdown_fn = ffn_markdown
        part_expert_ffn(parts["expert_ffn"], args)
    else:
        raise ValueError(f"unknown part group {group!r}")


# ---- parent -----------------------------------------------------------------------------------------------------
def groups_to_run(only: str | None) -> list[tuple[str, list[str]]]:
    names = list(PARTS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in PARTS]
    if bad:
        raise SystemExit(f"--only: unknown parts {bad}; choose from {', '.join(PARTS)}")
    out: list[tuple[str, list[str]]] = []
    for n in PARTS:  # suite order, whatever order --only gave
        if n in names:
            g = PARTS[n][0]
            if out and out[-1][0] == g:
                out[-1][1].append(n)
            else:
                out.append((g, [n]))
    return out


def child_argv(args, group: str, names: list[str], deadline: float) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--part", group, "--only", ",".join(names), "--out", args.out,
            "--deadline", f"{deadline:.3f}", "--budget-s", str(args.budget_s)]
    for flag in ("routing", "repeats", "expert_mib", "ds_steps_b1", "ds_steps_b8", "mixtral_tokens", "hf_tokens",
                 "policy_tokens", "ffn_shapes", "ffn_tokens"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    return argv + (["--dry-run"] if args.dry_run else [])


def stream(proc, log_path: str, group: str) -> threading.Thread:
    """Copies the child's output to its log and, line by line, to our stdout (the run's visible progress)."""
    def pump():
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("[") or "Error" in line or "error" in line.lower()[:80]:
                    sys.stdout.write(line)
                    sys.stdout.flush()
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    return th


def end_record(args, name: str, why: str, rc, log_path: str) -> None:
    """Marks a part that did not finish its own record (killed, crashed, never started), keeping its rows."""
    path = os.path.join(args.out, f"{name}.json")
    rec = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            rec = None
    if rec is not None and rec.get("status") not in ("running", None):
        return
    tail = ""
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
    part = Part(name, args.out, args.dry_run, time.time(), args.budget_s)
    if rec is not None:
        part.record.update({k: v for k, v in rec.items() if k not in ("status",)})
    part.record["status"] = why
    part.record["returncode"] = rc
    part.record["log_tail"] = tail
    part.markdown_fn = lambda r: "\n".join(md_header(r, f"{name}: {why}")) + "\n```\n" + tail[-1500:] + "\n```\n"
    part.save()


def run_parent(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    end = t0 + args.budget_s
    env = dict(os.environ)
    env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", HOST_MEMORY_LIMIT_GB)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    plan = groups_to_run(args.only)
    status = {}
    for i, (group, names) in enumerate(plan):
        nominal, minimum = (DRY_SECONDS, 5) if args.dry_run else PARTS[group][1:]  # a group's time is its lead's
        later_min = 0 if args.dry_run else sum(PARTS[g][2] for g, _ in plan[i + 1:])
        left = end - time.time()
        limit = min(nominal, left - later_min) if not args.dry_run else min(nominal, left)
        if limit < minimum:
            why = (f"skipped: suite budget — {left:.0f} s left of {args.budget_s:.0f} s, {later_min:.0f} s "
                   f"kept for later parts; this part needs at least {minimum} s")
            print(f"== {group}: {why}", flush=True)
            for n in names:
                end_record(args, n, why, None, "")
                status[n] = why
            continue
        deadline = time.time() + limit
        log_path = os.path.join(args.out, f"{group}.log")
        for n in names:  # a stale record from an earlier run must not pass for this one
            for ext in (".json", ".md"):
                if os.path.exists(os.path.join(args.out, n + ext)):
                    os.remove(os.path.join(args.out, n + ext))
        print(f"== {group} ({', '.join(names)}): up to {limit:.0f} s (+{HARD_KILL_GRACE_S} s grace)", flush=True)
        ts = time.time()
        proc = subprocess.Popen(child_argv(args, group, names, deadline), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        pump = stream(proc, log_path, group)
        try:
            rc = proc.wait(timeout=max(1.0, deadline + HARD_KILL_GRACE_S - time.time()))
            why = f"crashed (exit code {rc}) before finishing its record"
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            why = "killed at its time limit (rows up to then kept)"
        pump.join(timeout=5)
        for n in names:
            end_record(args, n, why, rc, log_path)
            status[n] = read_status(args.out, n)
        print(f"== {group} done in {time.time() - ts:.0f} s: " + ", ".join(f"{n} {status[n]}" for n in names),
              flush=True)
    try:
        print(summary_markdown(summarize(args, status, time.time() - t0)), flush=True)
    except Exception as e:  # noqa: BLE001 — the part records are written; a summary bug must not hide them
        print(f"summary failed ({type(e).__name__}: {e}); the part records in {args.out} are complete", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"status": status, "summary_error": f"{type(e).__name__}: {e}"}, f, indent=1)
    return 0


def read_status(out: str, name: str) -> str:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f).get("status", "?")
    except (OSError, json.JSONDecodeError):
        return "no record"


def load(out: str, name: str) -> dict:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def summarize(args, status: dict, wall_s: float) -> dict:
    """The issue's GPU figures, picked out of the part records."""
    heads: dict = {}
    tr = load(args.out, "transfer")
    if tr:
        ov = tr.get("overlap", {})
        heads.update(h2d_peak_gb_per_s=tr.get("h2d_peak_gb_per_s"), hbm_gb_per_s=tr.get("hbm_gb_per_s"),
                     overlap_in_program=ov.get("in_program", {}).get("overlap_fraction"),
                     overlap_device_put_after=ov.get("device_put_after_compute", {}).get("overlap_fraction"),
                     copy_start_in_program_hlo=tr.get("copy_start_in_program"), best_overlap=tr.get("best_overlap"))
    ds = load(args.out, "deepseek")
    lru50 = [r for r in ds.get("rows", []) if (r.get("policy"), r.get("budget"), r.get("batch")) == ("lru", 0.5, 1)]
    lru50.sort(key=lambda r: r.get("routing") != "replay")  # the replayed trace's row when there is one
    for r in lru50[:1]:
        heads.update(deepseek_lru50_b1_routing=r.get("routing"), deepseek_lru50_b1_copier=r.get("transfers"),
                     deepseek_lru50_b1_tokens_per_s=r.get("tokens_per_s"),
                     deepseek_lru50_b1_roofline_tokens_per_s=r.get("roofline_tokens_per_s"),
                     deepseek_lru50_b1_frac_of_roofline=r.get("frac_of_roofline"))
    heads["deepseek_ratios"] = ds.get("ratios")
    heads["copier_ratios"] = load(args.out, "copiers").get("ratios")
    heads["quant_vs_float"] = load(args.out, "quant").get("vs_float")
    heads["ef_jax_vs_accelerate"] = load(args.out, "hf_accelerate").get("ratios")
    targets = {"overlap_in_program": 0.8, "deepseek_lru50_b1_frac_of_roofline": 0.8}
    rec = {"meta": run_meta(), "dry_run": args.dry_run, "budget_s": args.budget_s, "wall_s": wall_s,
           "status": status, "headline": heads, "targets": targets, "out": args.out}
    for name in status:
        m = load(args.out, name).get("meta")
        if m and "device" in m:
            rec["meta"].update({k: m[k] for k in ("device", "backend", "jax", "jaxlib") if k in m})
            break
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(rec))
    return rec


def summary_markdown(rec: dict) -> str:
    m, h = rec["meta"], rec["headline"]
    lines = [f"# gpu_suite summary — {m.get('device', '?')}, jax {m.get('jax', '?')}, commit {m['commit']}", "",
             f"{'DRY RUN (tiny shapes, CPU) — ' if rec['dry_run'] else ''}{rec['wall_s']:.0f} s of a "
             f"{rec['budget_s']:.0f} s budget; host {m['host']}.", ""]
    lines += table(["part", "status"], [[k, v] for k, v in rec["status"].items()])
    t = rec["targets"]
    lines += ["", "| figure | value | target (issue 13 unless named) |", "|---|---|---|",
              f"| pinned H2D peak | {fmt(h.get('h2d_peak_gb_per_s'))} GB/s | |",
              f"| HBM copy | {fmt(h.get('hbm_gb_per_s'), 0)} GB/s | |",
              f"| copy overlap, copies inside the compute's program | {fmt(h.get('overlap_in_program'))} | "
              f"≥ {t['overlap_in_program']} |",
              f"| copy overlap, device_put after the compute | {fmt(h.get('overlap_device_put_after'))} | |",
              f"| copy-start in the in-program HLO | {fmt(h.get('copy_start_in_program_hlo'))} | > 0 on GPU |",
              f"| DeepSeek full depth, lru 50 %, batch 1: tokens/s (roofline) | "
              f"{fmt(h.get('deepseek_lru50_b1_tokens_per_s'))} ({fmt(h.get('deepseek_lru50_b1_roofline_tokens_per_s'))})"
              f" | |",
              f"| … as a fraction of the roofline | {fmt(h.get('deepseek_lru50_b1_frac_of_roofline'))} | "
              f"≥ {t['deepseek_lru50_b1_frac_of_roofline']} |"]
    for r in h.get("deepseek_ratios") or []:
        lines.append(f"| DeepSeek {int(100 * r['budget'])}% batch {r['batch']} ({r['routing']} routing): "
                     f"expertflow/lru, expertflow/nocache | {fmt(r['expertflow/lru'])}, "
                     f"{fmt(r['expertflow/nocache'])} | |")
    for v in h.get("quant_vs_float") or []:
        lines.append(f"| DeepSeek lru 25 % batch 1, {v['expert_dtype']} vs float at the same expert_memory: bytes "
                     f"per expert ×, hit rate +, tokens/s × | {fmt(v['bytes_per_expert'])}, {fmt(v['hit_rate_gain'])}"
                     f", {fmt(v['tokens_per_s'])} | issue 16: bytes ≤ 0.55 (int8) / ≤ 0.30 (int4) of bf16; "
                     "int4 hit rate higher |")
    for k, v in (h.get("copier_ratios") or {}).items():
        lines.append(f"| copiers {k} (tokens/s) | {fmt(v)} | |")
    for k, v in (h.get("ef_jax_vs_accelerate") or {}).items():
        lines.append(f"| {k} | {fmt(v) if not isinstance(v, str) else v} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    if args.budget_s is None:
        args.budget_s = 3000.0 if args.dry_run else 540.0
    if args.part:
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
