"""gpu_suite part "quant": int8 / int4 experts against float on the full-depth DeepSeek-V2-Lite shapes, at the same
expert_memory (runs in the deepseek child: the same random model, pinned once, the same replayed routing).

[the deepseek part's model (float experts)] → per expert dtype (float, int8, int4): quantize the routed experts
  (ef_jax.quant, each distinct expert bank once) → pin the quantized store → lru at expert_memory = BUDGET of the
  float experts' bytes, batch 1, a burn-in run identical to the timed one (GPU) → teacher-forced run through
  ef_jax.evalpolicy → tokens/s, bytes per expert, slots per layer, hit rate, beside the roofline
  (max(resident step time, misses × quantized expert bytes / pinned H2D peak)) and the float row's figures.
Also recorded per dtype: what expert_memory="auto" would choose on this device for 1 row × 4096 positions
(ef_jax.engine.transfer.device_memory), so a GPU run shows the auto budget next to the measured peak bytes in use.

Axes: L MoE layers, E experts, K top-k.
"""
from __future__ import annotations

import dataclasses
import gc
import time

from suite_common import add_roofline, fmt, md_header, pin_store, replay_override, table, teacher_forced_row

QUANT_DTYPES = ("int8", "int4")
BUDGET = 0.25  # of the float experts' bytes: float experts are transfer-bound there (the issue's case)
AUTO_KV_SHAPE = (1, 4096)


def quantized(model, expert_dtype: str):
    """`model` with its routed experts quantized; layers that share a host expert bank (the suite's fast random
    model draws one bank for every layer) share its quantization too, so it runs once per bank."""
    from ef_jax.quant.pool import quantize_experts
    from ef_jax.quant.codes import spec_for
    spec = spec_for(expert_dtype, None, model.dtype)
    done: dict[int, object] = {}
    experts = []
    from ef_jax.host_experts import ArrayRows
    for ex in model.experts.layers:
        if id(ex) not in done:
            done[id(ex)] = quantize_experts(ex, spec)
        experts.append(done[id(ex)])
    return dataclasses.replace(model, experts=ArrayRows(experts), expert_quant=spec)


def auto_choice(model, bytes_per_expert: int) -> dict:
    from ef_jax.engine.transfer.device_memory import resolve_auto
    try:
        return resolve_auto(model, bytes_per_expert, AUTO_KV_SHAPE).as_stats()
    except ValueError as e:  # BudgetTooSmall: the refusal is the figure
        return {"refused": str(e)}


def part_quant(part, model, ids, trace, setup: dict, compute_step_s: float | None) -> None:
    """Rows float / int8 / int4 into part.record, each compared with the float row (`vs_float`)."""
    import ef_jax
    from ef_jax.engine.transfer.store import store_for
    dry = part.dry_run
    steps = setup["steps"][1]
    budget = int(BUDGET * setup["expert_bytes_total"])
    float_name = {"bfloat16": "bf16", "float32": "f32"}[model.dtype]
    part.record["setup"] = {**{k: v for k, v in setup.items() if k != "trace"}, "expert_memory": budget,
                            "budget_fraction_of_float": BUDGET, "float_dtype": float_name, "batch": 1,
                            "steps": steps, "policy": "lru", "auto_kv_shape": AUTO_KV_SHAPE}
    part.record["rows"] = []
    part.save()
    override = replay_override(trace, 1) if trace is not None else None
    for dt in (float_name, *QUANT_DTYPES):
        est = 6 if dry else (45 if dt in QUANT_DTYPES else 16)  # quantize + pin + burn-in + timed run
        if not part.has_time(est, f"{dt} at {int(100 * BUDGET)}%"):
            continue
        m = None
        try:
            t = time.perf_counter()
            m = model if dt == float_name else quantized(model, dt)
            quantize_s = time.perf_counter() - t if m is not model else 0.0
            pin_s = pin_store(m)
            per = store_for(m).bytes_per_expert
            off = ef_jax.OffloadConfig(expert_memory=budget, policy="lru")
            burn_s = None
            if not dry:  # the burn-in compiles every program variant the timed run meets (timing is moot dry)
                t = time.perf_counter()
                teacher_forced_row(m, ids, off, 1, steps, override)
                burn_s = time.perf_counter() - t
            row = teacher_forced_row(m, ids, off, 1, steps, override)
            row.update(expert_dtype=dt, bytes_per_expert=per, bytes_vs_float=per / setup["bytes_per_expert"],
                       expert_memory=budget, budget=BUDGET, batch=1, policy="lru", quantize_s=quantize_s,
                       pin_s=pin_s, burn_in_s=burn_s, routing="replay" if override is not None else "model",
                       auto=auto_choice(m, per))
        except Exception as e:  # noqa: BLE001 — one dtype failing must not end the part
            part.error(dt, e)
            part.save()
            continue
        finally:
            if m is not None and m is not model:
                del m  # its pinned store goes with it (ef_jax.engine.transfer.store keeps stores by weak reference)
                gc.collect()
        add_roofline(row, compute_step_s, per, setup["h2d_peak"])
        part.record["rows"].append(row)
        part.record["vs_float"] = vs_float(part.record["rows"])
        part.save()
        print(f"[quant] {dt:5s} {per / 1e6:7.2f} MB/expert, {row['slots_per_layer']} slots/layer at "
              f"{budget / 2**30:.2f} GiB: {row['tokens_per_s']:8.2f} tok/s, hit {fmt(row['hit_rate'], 3)}, roofline "
              f"{fmt(row.get('roofline_tokens_per_s'))}", flush=True)


def vs_float(rows: list[dict]) -> list[dict]:
    """Each quantized row against the float row: bytes, slots, hit rate and tokens/s ratios."""
    base = next((r for r in rows if r["expert_dtype"] not in QUANT_DTYPES), None)
    if base is None:
        return []
    return [{"expert_dtype": r["expert_dtype"], "bytes_per_expert": r["bytes_vs_float"],
             "slots": r["slots_per_layer"] / base["slots_per_layer"],
             "hit_rate_gain": r["hit_rate"] - base["hit_rate"],
             "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"]}
            for r in rows if r["expert_dtype"] in QUANT_DTYPES]


def quant_markdown(rec: dict) -> str:
    s = rec.get("setup", {})
    lines = md_header(rec, "Quantized experts on the DeepSeek-V2-Lite shapes, at the same expert_memory")
    if s:
        lines += [f"{s.get('model')}; non-expert weights {s.get('dtype')}; expert_memory "
                  f"{s.get('expert_memory', 0) / 2**30:.2f} GiB = {int(100 * s.get('budget_fraction_of_float', 0))} % "
                  f"of the {s.get('float_dtype')} experts; lru, batch 1, {s.get('steps')} teacher-forced steps; "
                  f"routing: {s.get('routing')}; pinned H2D peak {fmt(s.get('h2d_peak_gb_per_s'))} GB/s.", "",
                  "Roofline tokens/s = 1 / max(resident step time, misses per step × the dtype's expert bytes / "
                  "peak). 'auto' is what expert_memory=\"auto\" would choose on this device for 1 × 4096 positions.",
                  ""]
    rows = [[r["expert_dtype"], r["bytes_per_expert"] / 1e6, r.get("bytes_vs_float"), r.get("slots_per_layer"),
             r.get("hit_rate"), r.get("tokens_per_s"), r.get("roofline_tokens_per_s"), r.get("frac_of_roofline"),
             r.get("stall_ms_per_token"), r.get("mb_per_token"), r.get("quantize_s"), r.get("pin_s"),
             (r.get("auto") or {}).get("slots_per_layer", "refused" if "refused" in (r.get("auto") or {}) else None)]
            for r in rec.get("rows", [])]
    lines += table(["experts", "MB/expert", "× float bytes", "slots/layer", "hit rate", "tokens/s", "roofline tok/s",
                    "× roofline", "stall ms/token", "MB/token H2D", "quantize s", "pin s", "auto slots"], rows)
    if rec.get("vs_float"):
        lines += ["", "Against the float row (same expert_memory):", ""]
        lines += table(["experts", "bytes/expert ×", "slots ×", "hit rate +", "tokens/s ×"],
                       [[v["expert_dtype"], v["bytes_per_expert"], v["slots"], v["hit_rate_gain"], v["tokens_per_s"]]
                        for v in rec["vs_float"]])
    return "\n".join(lines) + "\n"
