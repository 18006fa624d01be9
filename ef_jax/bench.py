"""`ef-jax bench`: how fast this model runs on this machine — prompt processing and generation tokens/s, resident
and offloaded at a few budgets, policies and step modes, with hit rate, bytes per token and the measured
host→device bandwidth beside them (what llama-bench tells llama.cpp users).

model → host→device GB/s (device_put of expert-sized buffers) → per configuration: one burn-in run (its compile
time reported apart, its speed not) → --repetitions timed runs → mean (± spread) → markdown table | JSON

Prompt ids are random (the speed of a step does not depend on which tokens), so any checkpoint can be measured,
with or without a tokenizer. Tokens/s are the engine's own: prefill excludes compile time, decode counts only the
steps that compiled nothing (ef_jax.engine.loop.decode).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One row: `slots` None = every expert resident."""
    policy: str
    slots: int | None
    step: str = "layer"

    @property
    def name(self) -> str:
        if self.slots is None:
            return "resident"
        return f"{self.policy}, {self.slots} slots/layer" + ("" if self.step == "layer" else f", step {self.step}")


def configs(num_experts: int, top_k: int, budgets: list[float], policies: list[str], steps: list[str],
            resident: bool = True) -> list[BenchConfig]:
    """Resident (if asked) then every budget (a fraction of each layer's experts, at least top-k) × policy × step."""
    out = [BenchConfig("resident", None)] if resident else []
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budget {b} must be a fraction in (0, 1] of each MoE layer's experts")
        slots = max(top_k, min(num_experts, round(b * num_experts)))
        out += [BenchConfig(p, slots, s) for p in policies for s in steps]
    return out


def host_to_device_gbps(nbytes: int, repeats: int = 5) -> float:
    """Measured host→device copy bandwidth for buffers of `nbytes` (the median of `repeats` copies)."""
    import jax
    host = np.ones(max(nbytes, 1 << 20) // 4, np.float32)
    jax.device_put(host).block_until_ready()  # first copy: allocation and warm-up, not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.device_put(host).block_until_ready()
        times.append(time.perf_counter() - t0)
    return host.nbytes / statistics.median(times) / 1e9


def run_config(model, cfg: BenchConfig, prompt_tokens: int, gen_tokens: int, repetitions: int,
               seed: int = 0) -> dict:
    """Burn-in (compiles; excluded) then `repetitions` timed runs of one prompt; the row's mean figures."""
    import ef_jax
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, prompt_tokens).tolist()
    offload = None if cfg.slots is None else ef_jax.OffloadConfig(slots_per_layer=cfg.slots, policy=cfg.policy,
                                                                   step=cfg.step)

    def once():
        return ef_jax.generate(model, [ids], max_new_tokens=gen_tokens, offload=offload).stats

    burn = once()
    runs = [once() for _ in range(repetitions)]
    pp = [s["prompt_tokens"] / s["prefill_s"] for s in runs if s["prefill_s"] > 0]
    tg = [s["tokens_per_s"] for s in runs if s["tokens_per_s"] == s["tokens_per_s"]]
    row = {"config": cfg.name, "policy": cfg.policy, "slots_per_layer": cfg.slots, "step": cfg.step,
           "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repetitions": repetitions,
           "pp_tokens_per_s": _mean(pp), "pp_spread": _spread(pp), "tg_tokens_per_s": _mean(tg),
           "tg_spread": _spread(tg), "compile_s": burn["compile_s"] + burn.get("warmup_s", 0.0)}
    if offload is not None:
        gen = sum(s["generated_tokens"] for s in runs)
        row.update(hit_rate=_mean([s["hit_rate"] for s in runs]),
                   mb_per_token=sum(s.get("h2d_bytes_real", s["h2d_bytes"]) for s in runs) / max(gen, 1) / 1e6)
    return row


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _spread(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def bench(model, cfgs: list[BenchConfig], *, prompt_tokens: int = 128, gen_tokens: int = 32,
          repetitions: int = 3) -> dict:
    """Every configuration's row plus the machine: {device, model, per_expert_bytes, h2d_gbps, rows}."""
    import jax
    per_expert = model.param_bytes()["per_expert"]
    record = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "model": model.path,
              "dtype": model.dtype, "per_expert_bytes": per_expert,
              "h2d_gbps": host_to_device_gbps(per_expert * model.config.top_k), "rows": []}
    for cfg in cfgs:
        record["rows"].append(run_config(model, cfg, prompt_tokens, gen_tokens, repetitions))
    return record


def _fmt(v, spread=None, digits=1) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread else "")


def markdown(record: dict) -> str:
    """The table: one row per configuration, the machine's figures above it."""
    head = (f"model `{record['model']}` ({record['dtype']}, {record['per_expert_bytes'] / 1e6:.2f} MB per expert) "
            f"on {record['device']} ({record['backend']}); host→device {record['h2d_gbps']:.1f} GB/s measured\n\n")
    lines = ["| configuration | pp tokens/s | tg tokens/s | hit rate | MB/token H2D | compile s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['config']} | {_fmt(r['pp_tokens_per_s'], r['pp_spread'])} | "
                     f"{_fmt(r['tg_tokens_per_s'], r['tg_spread'])} | {_fmt(r.get('hit_rate'), digits=3)} | "
                     f"{_fmt(r.get('mb_per_token'), digits=2)} | {r['compile_s']:.1f} |")
    r0 = record["rows"][0] if record["rows"] else {}
    foot = (f"\npp: {r0.get('prompt_tokens')}-token prompt, tg: {r0.get('gen_tokens')} generated tokens; mean of "
            f"{r0.get('repetitions')} runs after a burn-in run (± standard deviation); compile: the burn-in's.")
    return head + "\n".join(lines) + "\n" + foot
