"""gpu_suite parts on whole models: full-depth DeepSeek-V2-Lite shapes against the roofline, the copiers at one
budget, and a few-layer Mixtral shape (whose tokens/s the transformers + accelerate part compares against).

deepseek: [random model, 26 MoE layers × 64 experts of 17.3 MB bf16, pinned once] → resident per batch (the compute
  time) → per (budget, batch, policy ∈ nocache / lru / expertflow / predictive): a burn-in run identical to the
  timed one (so it compiles every program variant the timed run meets), then the timed teacher-forced run through
  ef_jax.evalpolicy (one decode step per token and row, routing replayed from a real
  DeepSeek-V2-Lite trace when one is found) → tokens/s beside the roofline
      roofline step time = max(resident step time at that batch, misses per step × expert bytes / pinned H2D peak)
  with misses and hit rate from the same run and the peak measured at the start of the part. Each run starts from
  a cold cache (a fresh Forward), and the roofline counts the same cold misses.
host compute (issue 27, in the deepseek part after the device rows): lru 25 %, batch 1, host_compute never / auto /
always, tokens/s beside a roofline that splits each step's misses between PCIe and the host FFN (its rate
calibrated by the run); on the CPU a dry run only.
device (issue 14, in the deepseek part, right after the first batch-1 sweep): OffloadConfig(step="device") — the
  whole token step in one program, the cache on the device — at lru 25 / 50 % (a dry run: 25 %), batch 1, beside
  the layer mode on the same routing: the model's own router (a device step routes on the device, so a trace cannot
  be replayed into it; with a trace, layer-mode "own routing" rows are added for the comparison). The layer store is dropped while the
  device rows pin their per-layer stacks (one ~28 GB pinned copy at a time), and re-pinned after them.
copiers: lru at 50 %, batch 1, one row per OffloadConfig.transfers mode (inline / thread / program when built).
quant: float / int8 / int4 experts at one expert_memory (benchmarks/suite_quant.py), after the copiers.
mixtral: resident, nocache at top-k slots, lru and expertflow at half the experts, batch 1, through ef_jax.generate
  with two prompts in one cache: the first warms the cache, the second is timed (decode tokens/s); the whole call
  runs once before as a burn-in, so the timed call compiles nothing.

Axes: L MoE layers, E experts, K top-k, B rows, T decode steps.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import time

import numpy as np

from suite_common import (add_roofline, fast_model, fmt, md_header, pin_store, release, replay_override, table,
                          teacher_forced_row)

from ef_jax.policies.registry import PolicySpec

POLICIES = ("nocache", "lru", "expertflow", "predictive")


# ---- shapes -----------------------------------------------------------------------------------------------------
def deepseek_config(dry: bool):
    from ef_jax.config import RopeConfig
    from ef_jax.random_model import presets, with_layers
    cfg = with_layers(presets()["deepseek-v2-lite"], 2 if dry else 26)
    if dry:  # same family, routing (64 experts, top-6) and layer kinds; tiny widths; two MoE layers (a next layer
        # for the predicting policies) because a CPU compiles the device step's unrolled layers for seconds each
        cfg = dataclasses.replace(cfg, vocab_size=256, hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=24,
                                  kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                  attn_scale=24 ** -0.5, rope=RopeConfig(theta=1e4, dim=8, interleaved=True),
                                  moe_intermediate=32, shared_intermediate=64)
    return cfg


def mixtral_config(dry: bool):
    from ef_jax.config import RopeConfig
    from ef_jax.random_model import presets, with_layers
    cfg = with_layers(presets()["mixtral"], 2 if dry else 4)
    if dry:
        cfg = dataclasses.replace(cfg, vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                  attn_scale=16 ** -0.5, rope=RopeConfig(theta=1e6, dim=16), moe_intermediate=128)
    return cfg


def compute_dtype(dry: bool) -> str:
    import jax
    return "float32" if dry or jax.default_backend() == "cpu" else "bfloat16"


# ---- routing replay ---------------------------------------------------------------------------------------------
def find_trace(explicit: str | None) -> str | None:
    """A DeepSeek-V2-Lite routing trace: --routing, else the first .npz in shared/data/routing beside or inside the
    checkout, or a deepseek-v2-lite*.npz copied into benchmarks/data (an untracked copy travels with a working tree
    to a lent GPU machine); else None (the model's own routing)."""
    if explicit:
        return explicit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(root, "..", "shared", "data", "routing"), os.path.join(root, "shared", "data", "routing"),
              os.path.join(root, "benchmarks", "data")):
        hits = sorted(glob.glob(os.path.join(d, "deepseek-v2-lite*.npz")))
        if hits:
            return os.path.abspath(hits[0])
    return None


def add_host_roofline(row: dict, compute_step_s: float | None, bytes_per_expert: int, peak: float,
                      host_bytes_per_s: float | None) -> None:
    """roofline with host compute: each step's misses split between the copy stream (PCIe, `peak`) and the host
    FFN (`host_bytes_per_s`, calibrated by the run) working at once: max(compute, misses × bytes / (peak + host))."""
    if compute_step_s is None or row.get("misses") is None or not host_bytes_per_s:
        return
    steps, B = row["steps"], row["tokens"] / row["steps"]
    both = row["misses"] / steps * bytes_per_expert / (peak + host_bytes_per_s)
    roof = max(compute_step_s, both)
    row.update(host_gb_per_s=host_bytes_per_s / 1e9, roofline_host_step_s=roof, roofline_host_tokens_per_s=B / roof,
               frac_of_roofline_host=row["tokens_per_s"] / (B / roof))


# ---- deepseek + copiers -----------------------------------------------------------------------------------------
def deepseek_setup(dry: bool, args):
    """(model, trace u8[N, L, K] or None, setup dict): the model built and pinned once, the peak measured."""
    from bench_offload import measure_h2d_peak
    from ef_jax.cache.config import TRANSFER_MODES
    cfg = deepseek_config(dry)
    dtype = compute_dtype(dry)
    peak = measure_h2d_peak(4 << 20 if dry else 256 << 20)
    t = time.perf_counter()
    model = fast_model(cfg, dtype)
    build_s = time.perf_counter() - t
    per = model.param_bytes()["per_expert"]
    trace_path = find_trace(args.routing)
    trace = None
    if trace_path:
        from ef_jax.trace import load_trace
        trace = load_trace(trace_path).experts
        if trace.shape[-1] != cfg.top_k or int(trace.max()) >= cfg.num_experts:
            raise ValueError(f"{trace_path}: top-{trace.shape[-1]} of {int(trace.max()) + 1} experts does not fit "
                             f"top-{cfg.top_k} of {cfg.num_experts}")
    setup = {"model": cfg.describe(), "dtype": dtype, "bytes_per_expert": per,
             "expert_bytes_total": per * cfg.num_moe_layers * cfg.num_experts, "build_s": build_s,
             "h2d_peak_gb_per_s": peak / 1e9, "h2d_peak": peak, "budgets": (0.25, 0.5, 1.0), "policies": POLICIES,
             "steps": {1: 3, 8: 2} if dry else {1: args.ds_steps_b1, 8: args.ds_steps_b8},
             "routing": f"replayed from {os.path.basename(trace_path)}" if trace is not None
             else "the random model's own router (no trace found)", "trace": trace_path,
             "transfer_modes": list(TRANSFER_MODES),
             "host_memory_limit_gb": os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")}
    setup["pin_s"] = pin_store(model)
    print(f"[deepseek] {cfg.describe()}, {dtype}, {setup['expert_bytes_total'] / 1e9:.1f} GB of experts built in "
          f"{build_s:.1f} s, pinned in {fmt(setup['pin_s'], 1)} s; H2D peak {peak / 1e9:.1f} GB/s; routing "
          f"{setup['routing']}", flush=True)
    return model, trace, setup


def part_deepseek(parts: dict, args) -> None:
    """parts: name → Part for "deepseek", "copiers" and/or "quant" (one model build serves them all)."""
    import ef_jax
    from ef_jax.cache.config import TRANSFER_MODES
    dry = next(iter(parts.values())).dry_run
    model, trace, setup = deepseek_setup(dry, args)
    cfg, steps, per, peak = model.config, setup["steps"], setup["bytes_per_expert"], setup["h2d_peak"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 8 * (max(steps.values()) + 1)).tolist()
    for p in parts.values():
        p.record["setup"] = setup
        p.record["rows"] = []
        p.save()
    slots_of = lambda frac: min(cfg.num_experts, max(cfg.top_k, round(frac * cfg.num_experts)))
    resident: dict[int, float] = {}  # batch → resident seconds per step (the roofline's compute)
    warmed: set = set()

    def run(part, label, offload, batch, policy, frac, routing="replay", burn=True):
        """One row into part's record, after a burn-in run of the same configuration. The grid runs the engine's
        default copier; the copiers part names one."""
        transfers = offload.transfers if offload is not None else "-"
        est = 4 if dry else (8 if batch == 1 else 15)
        if not part.has_time(est * (2 if burn else 1), f"{label} batch {batch}"):
            return None
        override = None
        if routing == "replay" and trace is not None and offload is not None:
            override = replay_override(trace, batch)
        try:
            # every configuration gets its own burn-in: the program copier compiles one expert-program variant per
            # load-count bucket, and which buckets a run meets depends on the policy (its prefetches); the burn-in
            # replays the timed run exactly (same tokens, same routing), so the timed run compiles nothing
            step = getattr(offload, "step", "layer")
            key = (offload.slots_per_layer if offload else "resident", batch, transfers, override is None, policy, step,
                   getattr(offload, "host_compute", "never"))  # host compute compiles its own programs
            burn_s = None
            if burn and key not in warmed:
                t0 = time.perf_counter()
                teacher_forced_row(model, ids, offload, batch, steps[batch], override)
                burn_s = time.perf_counter() - t0
                warmed.add(key)
            row = teacher_forced_row(model, ids, offload, batch, steps[batch], override)
        except Exception as e:  # noqa: BLE001 — one configuration failing must not end the part
            part.error(f"{label} batch {batch}", e)
            part.save()
            return None
        row.update(policy=policy, budget=frac, batch=batch, routing="replay" if override is not None else "model",
                   transfers=transfers, burn_in_s=burn_s, step=getattr(offload, "step", "layer"))
        if offload is None:
            resident[batch] = row["wall_s"] / row["steps"]
        add_roofline(row, resident.get(batch), per, peak)
        part.record["rows"].append(row)
        ratios = policy_ratios if part.name == "deepseek" else copier_ratios
        part.record["ratios"] = ratios(part.record["rows"])  # kept current: a killed part still has them
        part.save()
        print(f"[{part.name}] {label:28s} B={batch} {row['tokens_per_s']:8.2f} tok/s hit {fmt(row['hit_rate'], 3)}"
              f" roofline {fmt(row.get('roofline_tokens_per_s'))} ({fmt(row.get('frac_of_roofline'))}×)"
              + (f" burn-in {burn_s:.1f} s" if burn_s else ""), flush=True)
        return row

    def sweep(part, batch, fracs, policies):
        for frac in fracs:
            for pol in policies:
                spec = PolicySpec("predictive", predictor="online") if pol == "predictive" else pol
                off = ef_jax.OffloadConfig(slots_per_layer=slots_of(frac), policy=spec)
                run(part, f"{pol} {int(frac * 100)}%", off, batch, pol, frac)

    ds, cp, qt = parts.get("deepseek"), parts.get("copiers"), parts.get("quant")
    lead_part = ds or cp or qt
    run(lead_part, "resident", None, 1, "resident", 1.0)
    release(model)
    if ds:  # the figures first: lru at 50 %, batch 1, and its ratios
        sweep(ds, 1, (0.5,), ("lru", "nocache", "expertflow", "predictive"))
        device_rows(ds, run, slots_of, model, trace is not None, dry)
        host_rows(ds, run, slots_of, setup, resident.get(1))
    if cp:
        half = slots_of(0.5)
        for mode in ("inline", "thread", "program"):
            if mode not in TRANSFER_MODES:
                cp.record["rows"].append({"policy": "lru", "budget": 0.5, "batch": 1, "transfers": mode,
                                          "status": "not available in this build"})
                cp.skip(f"transfers={mode!r}", "not available in this build (not in TRANSFER_MODES)")
                continue
            same = next((r for r in (ds.record["rows"] if ds else []) if (r["policy"], r["budget"], r["batch"],
                         r["transfers"], r["routing"]) == ("lru", 0.5, 1, mode, "replay" if trace is not None
                                                           else "model")), None)
            if same is not None:  # the grid's row is this configuration already (the engine's default copier)
                cp.record["rows"].append(dict(same))
                cp.record["ratios"] = copier_ratios(cp.record["rows"])
                cp.save()
                continue
            off = ef_jax.OffloadConfig(slots_per_layer=half, policy="lru", transfers=mode)
            run(cp, f"lru 50% {mode}", off, 1, "lru", 0.5)
        cp.record["ratios"] = copier_ratios(cp.record["rows"])
        cp.save()
    if qt:  # before the rest of the grid: a suite cut short still has the int8/int4 rows
        from suite_quant import part_quant
        part_quant(qt, model, ids, trace, setup, resident.get(1))
    if not ds:
        return
    # a dry run walks every kind of row once (each budget, both batches), not the whole grid
    # (dry: lru and expertflow, the layer-mode rows device_rows' dry policies are compared with when no trace
    # is found — with one, device_rows runs its own "own routing" rows)
    sweep(ds, 1, (0.25,) if dry else (0.25, 1.0), ("lru", "expertflow") if dry else POLICIES)
    run(ds, "resident", None, 8, "resident", 1.0)
    release(model)
    sweep(ds, 8, (0.5,) if dry else (0.5, 0.25, 1.0), ("lru",) if dry else POLICIES)
    if trace is not None:  # expertflow predicts with the model's routers: show it on the routing it predicts too
        # (without a trace every row above already runs on the model's own routing)
        for pol in ("lru",) if dry else ("lru", "expertflow"):
            off = ef_jax.OffloadConfig(slots_per_layer=slots_of(0.5), policy=pol)
            run(ds, f"{pol} 50% own routing", off, 1, pol, 0.5, routing="model")
    ds.record["ratios"] = policy_ratios(ds.record["rows"])
    ds.record["device_step_ratios"] = device_ratios(ds.record["rows"])
    ds.save()


def host_rows(part, run, slots_of, setup, resident_step_s: float | None) -> None:
    """Issue 27: lru at 25 %, batch 1, host_compute never / auto / always (wall clock; auto decides from one copy
    and one host FFN timed at start), tokens/s beside the roofline counting PCIe and host bandwidth together."""
    import ef_jax
    from ef_jax.cache.host_compute import HOST_COMPUTE_MODES
    rows = []
    for mode in ("never", "auto", "always"):
        if mode not in HOST_COMPUTE_MODES:
            part.skip(f"host_compute={mode!r}", "not available in this build")
            continue
        off = ef_jax.OffloadConfig(slots_per_layer=slots_of(0.25), policy="lru", host_compute=mode)
        row = run(part, f"lru 25% host {mode}", off, 1, "lru", 0.25)
        if row is not None:
            row["host_compute"] = mode
            rows.append(row)
    host_rate = next((r["host_calibration"]["host_bytes_per_s"] for r in rows if r.get("host_calibration")), None)
    for r in rows:
        add_host_roofline(r, resident_step_s, setup["bytes_per_expert"], setup["h2d_peak"], host_rate)
    part.record["host_compute_rows"] = [{k: r.get(k) for k in ("host_compute", "tokens_per_s", "hit_rate",
                                                                "host_computed", "bytes_not_moved", "host_gb_per_s",
                                                                "roofline_tokens_per_s", "roofline_host_tokens_per_s",
                                                                "frac_of_roofline_host")} for r in rows]
    part.save()


def device_rows(part, run, slots_of, model, traced: bool, dry: bool) -> None:
    """Issue 14: step="device" vs the layer mode, lru at 25 / 50 %, batch 1, the model's own routing; issue 26: the
    device step's own policies (lru / expertflow / predictive on the device) at 25 / 50 %, batch 1 and 8."""
    import ef_jax
    try:
        from ef_jax.engine.sources.device_experts import DeviceStepExperts  # noqa: F401
    except ImportError as e:
        part.skip("step='device'", f"not available in this build ({e})")
        return
    fracs = (0.25,) if dry else (0.25, 0.5)  # a dry run compiles few device steps (tens of seconds on a CI CPU)
    policies = ("lru", "expertflow") if dry else ("lru", "expertflow", "predictive")
    if traced:  # the grid replays the trace: the layer mode on the model's own routing, for the comparison
        for frac in fracs:
            for pol in policies:
                spec = PolicySpec("predictive", predictor="online") if pol == "predictive" else pol
                run(part, f"{pol} {int(frac * 100)}% own routing",
                    ef_jax.OffloadConfig(slots_per_layer=slots_of(frac), policy=spec), 1, pol, frac, routing="model")
    # the layer mode and the device step read the same pinned store (ef_jax.engine.transfer.residency)
    for batch in ((1,) if dry else (1, 8)):
        for frac in fracs:
            for pol in policies:
                spec = PolicySpec("predictive", predictor="online") if pol == "predictive" else pol
                off = ef_jax.OffloadConfig(slots_per_layer=slots_of(frac), policy=spec, step="device")
                name = f"{pol} {int(frac * 100)}% device step" + ("" if batch == 1 else f" batch {batch}")
                run(part, name, off, batch, pol, frac, routing="model")
    if part.has_time(30 if not dry else 5, "device step HLO"):
        try:
            hlo = device_step_hlo(model, ef_jax.OffloadConfig(slots_per_layer=slots_of(0.25), step="device"))
            with open(os.path.join(part.out_dir, "device_step_hlo.txt"), "w") as f:
                f.write(hlo.pop("text"))
            part.record["device_step_hlo"] = hlo
        except Exception as e:  # noqa: BLE001 — evidence missing must not end the part
            part.error("device step HLO", e)
    part.record["device_step_ratios"] = device_ratios(part.record["rows"])
    part.save()


def device_step_hlo(model, offload) -> dict:
    """What XLA made of the device step's in-program copies: its batch-1 decode program (one teacher-forced step
    compiles it), optimized HLO counted — host-memory (S(5)) operands, dynamic slices, async copies, loops,
    conditionals — with the host-memory lines kept as evidence; the text goes to <out>/device_step_hlo.txt."""
    import jax
    from ef_jax.engine.loop.decode import teacher_forced
    from ef_jax.engine.forward.forward import Forward
    with Forward(model, offload) as fwd:
        teacher_forced(fwd, np.zeros((1, 2), np.int32))
        text = fwd.source.step_hlo(1)
    lines = text.splitlines()
    count = lambda pred: sum(1 for ln in lines if pred(ln))
    return {"text": text, "backend": jax.default_backend(), "lines": len(lines),
            "host_memory_operands": count(lambda ln: "S(5)" in ln),
            "dynamic_slice": count(lambda ln: " dynamic-slice(" in ln),
            "copy_start": count(lambda ln: " copy-start(" in ln), "while": count(lambda ln: " while(" in ln),
            "conditional": count(lambda ln: " conditional(" in ln), "fusion": count(lambda ln: " fusion(" in ln),
            "host_memory_lines": [ln.strip()[:400] for ln in lines if "S(5)" in ln][:24]}


def device_ratios(rows: list[dict]) -> list[dict]:
    """device step / layer mode tokens/s per (budget, batch, policy) on the model's own routing."""
    out = []
    for r in rows:
        if r.get("step") != "device":
            continue
        key = (r["budget"], r["batch"], r["policy"])
        layer = next((x for x in rows if x.get("step", "layer") == "layer" and x.get("routing") == "model"
                      and (x["budget"], x["batch"], x["policy"]) == key), None)
        out.append({"budget": key[0], "batch": key[1], "policy": key[2], "device_tokens_per_s": r["tokens_per_s"],
                    "layer_tokens_per_s": layer and layer["tokens_per_s"],
                    "device/layer": layer and r["tokens_per_s"] / layer["tokens_per_s"],
                    "device_host_syncs_per_step": r.get("host_syncs_per_step"),
                    "layer_host_syncs_per_step": layer and layer.get("host_syncs_per_step")})
    return out


def policy_ratios(rows: list[dict]) -> list[dict]:
    """expertflow/lru, expertflow/nocache, lru/roofline per (budget, batch, routing), tokens/s (layer mode)."""
    out = []
    rows = [r for r in rows if r.get("step", "layer") == "layer"]
    keys = sorted({(r["budget"], r["batch"], r["routing"]) for r in rows if r.get("policy") in POLICIES})
    for b, B, rt in keys:
        tps = {r["policy"]: r["tokens_per_s"] for r in rows if (r["budget"], r["batch"], r["routing"]) == (b, B, rt)}
        lru = next((r for r in rows if (r["budget"], r["batch"], r["routing"], r["policy"]) == (b, B, rt, "lru")),
                   None)
        out.append({"budget": b, "batch": B, "routing": rt,
                    "expertflow/lru": tps["expertflow"] / tps["lru"] if {"expertflow", "lru"} <= set(tps) else None,
                    "expertflow/nocache": tps["expertflow"] / tps["nocache"]
                    if {"expertflow", "nocache"} <= set(tps) else None,
                    "predictive/lru": tps["predictive"] / tps["lru"] if {"predictive", "lru"} <= set(tps) else None,
                    "lru/roofline": lru.get("frac_of_roofline") if lru else None})
    return out


def copier_ratios(rows: list[dict]) -> dict:
    tps = {r["transfers"]: r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["policy"] == "lru"}
    return {f"{m}/inline": v / tps["inline"] for m, v in tps.items() if m != "inline" and "inline" in tps}


def models_markdown(rec: dict) -> str:
    s = rec.get("setup", {})
    title = {"deepseek": "Full-depth DeepSeek-V2-Lite shapes vs the roofline",
             "copiers": "Copiers at one budget (lru 50 %, batch 1)", "mixtral": "Mixtral shapes, few layers"}
    lines = md_header(rec, title[rec["part"]])
    if s:
        lines += [f"{s.get('model')}, {s.get('dtype')}; {s.get('bytes_per_expert', 0) / 1e6:.2f} MB per expert, "
                  f"{s.get('expert_bytes_total', 0) / 1e9:.2f} GB of experts in pinned host memory (built in "
                  f"{s.get('build_s', 0):.1f} s, pinned in {fmt(s.get('pin_s'), 1)} s); routing: {s.get('routing')}; measured pinned H2D peak "
                  f"{fmt(s.get('h2d_peak_gb_per_s'))} GB/s; {s.get('how', 'teacher-forced steps per run: ' + str(s.get('steps')))}.",
                  "", "Roofline tokens/s = B / max(resident step time at batch B, misses per step × expert bytes / "
                  "peak), misses from the same run; 'moved' uses the bytes really copied (prefetches included). "
                  "Replayed rows: the engine's route_override fetches the router logits at one more sync point per "
                  "MoE layer ('logits', to weight the replayed experts), so they carry one sync per layer that a "
                  "plain run does not; the own-routing rows have none.", ""]
    rows = [[r.get("policy"), f"{int(100 * r.get('budget', 1))}%", r.get("batch"), r.get("routing", "–"),
             r.get("step", "layer"), r.get("transfers", "–"), r.get("status") or r.get("tokens_per_s"),
             r.get("hit_rate"),
             r.get("roofline_tokens_per_s"), r.get("frac_of_roofline"), r.get("frac_of_roofline_moved"),
             r.get("stall_ms_per_token"), r.get("dispatches_per_step"), r.get("host_syncs_per_step"),
             r.get("burn_in_s")] for r in rec.get("rows", [])]
    lines += table(["policy", "budget", "batch", "routing", "step", "copier", "tokens/s", "hit rate", "roofline tok/s",
                    "× roofline", "× roofline (moved)", "stall ms/token", "dispatches/step", "syncs/step",
                    "burn-in s"], rows)
    if rec.get("ratios"):
        lines += ["", "Ratios (tokens/s):", ""]
        if isinstance(rec["ratios"], dict):
            lines += [f"- {k}: {fmt(v)}" for k, v in rec["ratios"].items()]
        else:
            lines += table(["budget", "batch", "routing", "expertflow/lru", "expertflow/nocache", "predictive/lru",
                            "lru × roofline"],
                           [[f"{int(100 * r['budget'])}%", r["batch"], r["routing"], r["expertflow/lru"],
                             r["expertflow/nocache"], r["predictive/lru"], r["lru/roofline"]] for r in rec["ratios"]])
    if rec.get("device_step_ratios"):
        lines += ["", "Device-resident step (OffloadConfig(step='device')) vs the layer mode, the model's own routing:",
                  ""]
        lines += table(["policy", "budget", "batch", "device tok/s", "layer tok/s", "device/layer", "device syncs/step",
                        "layer syncs/step"],
                       [[r["policy"], f"{int(100 * r['budget'])}%", r["batch"], r["device_tokens_per_s"],
                         r["layer_tokens_per_s"], r["device/layer"], r["device_host_syncs_per_step"],
                         r["layer_host_syncs_per_step"]] for r in rec["device_step_ratios"]])
    if rec.get("device_step_hlo"):
        h = rec["device_step_hlo"]
        lines += ["", "Device step HLO (batch-1 decode, optimized; full text in device_step_hlo.txt): "
                  + ", ".join(f"{k} {v}" for k, v in h.items() if k != "host_memory_lines"), ""]
        lines += ["```"] + h.get("host_memory_lines", []) + ["```"]
    return "\n".join(lines) + "\n"


# ---- mixtral ----------------------------------------------------------------------------------------------------
def generate_row(model, prompts, new_tokens, offload) -> dict:
    """Two prompts through one Forward (one expert cache): the first warms the cache, the second is timed; after a
    burn-in of the identical call (deterministic: it compiles every program variant the timed call meets)."""
    import ef_jax
    t = time.perf_counter()
    ef_jax.generate(model, prompts, max_new_tokens=new_tokens, offload=offload, batch_size=1)
    burn_s = time.perf_counter() - t
    res = ef_jax.generate(model, prompts, max_new_tokens=new_tokens, offload=offload, batch_size=1)
    s, timed = res.stats, res.stats["per_batch"][-1]
    row = {"tokens_per_s": timed["tokens_per_s"], "decode_s": timed["decode_s"], "prefill_s": timed["prefill_s"],
           "warm_decode_s": res.stats["per_batch"][0]["decode_s"], "generated_tokens": timed["generated_tokens"],
           "burn_in_s": burn_s,
           "dispatches_per_step": s.get("dispatches_per_step"), "host_syncs_per_step": s.get("host_syncs_per_step")}
    if offload is not None:
        row.update(hit_rate_both_prompts=s.get("hit_rate"), misses_both_prompts=s.get("misses"),
                   slots_per_layer=s.get("slots_per_layer"), copier=s.get("copier"))
    return row


def part_mixtral(part, args) -> None:
    import ef_jax
    dry = part.dry_run
    cfg = mixtral_config(dry)
    dtype = compute_dtype(dry)
    new_tokens = 4 if dry else args.mixtral_tokens
    t = time.perf_counter()
    model = fast_model(cfg, dtype)
    per = model.param_bytes()["per_expert"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, 16).tolist() for _ in range(2)]
    part.record["setup"] = {"model": cfg.describe(), "dtype": dtype, "bytes_per_expert": per,
                            "expert_bytes_total": per * cfg.num_moe_layers * cfg.num_experts,
                            "build_s": time.perf_counter() - t, "new_tokens": new_tokens, "prompt_tokens": 16,
                            "routing": "the random model's own router", "num_layers": cfg.num_layers,
                            "how": f"ef_jax.generate, batch 1, {new_tokens} new tokens: a first prompt warms the "
                                   "cache, the second is timed (decode tokens/s), after a burn-in of the same call",
                            "hf_config": hf_mixtral_kwargs(cfg)}
    part.record["rows"] = []
    part.save()
    K, E = cfg.top_k, cfg.num_experts
    half = max(K, E // 2)
    cases = [("resident", None, 1.0), ("nocache", ef_jax.OffloadConfig(slots_per_layer=K, policy="nocache"), K / E),
             ("lru", ef_jax.OffloadConfig(slots_per_layer=half, policy="lru"), half / E),
             ("expertflow", ef_jax.OffloadConfig(slots_per_layer=half, policy="expertflow"), half / E)]
    if dry:  # one offloaded row walks the same code as the others
        cases = [c for c in cases if c[0] in ("resident", "lru")]
    for name, off, frac in cases:
        if not part.has_time(5 if dry else 25, f"{name} {frac:.0%}"):
            continue
        try:
            row = generate_row(model, prompts, new_tokens, off)
        except Exception as e:  # noqa: BLE001
            part.error(f"{name} {frac:.0%}", e)
            continue
        row.update(policy=name, budget=frac, batch=1, slots=None if off is None else off.slots_per_layer)
        part.record["rows"].append(row)
        part.save()
        print(f"[mixtral] {name:10s} {frac:4.0%} {row['tokens_per_s']:8.2f} tok/s", flush=True)
        if off is None:
            release(model)


def hf_mixtral_kwargs(cfg) -> dict:
    """transformers MixtralConfig arguments for the same shapes as ef_jax's Mixtral ModelConfig."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.moe_intermediate,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope.theta,
            "tie_word_embeddings": cfg.tie_word_embeddings, "sliding_window": None,
            "max_position_embeddings": 4096}
