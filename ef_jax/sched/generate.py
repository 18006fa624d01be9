"""Generate many prompts in batches of B chosen by the route-aware scheduler; outputs come back in prompt order.

prompts → ids → route profiles f32[P, L·E] (given, or each prompt's routing over its own tokens) → route_batches
        (or arrival order) → ef_jax.generate per batch → results re-ordered to the input order

Axes: P prompts, L MoE layers, E experts, K routed experts per token, B prompts per batch.

Which prompts share a batch changes only which experts each step needs, never what a row computes (rows are
left-padded and masked), so every prompt's tokens equal its tokens under arrival order.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ef_jax.engine.batch import normalize_prompts
from ef_jax.sched.route_scheduler import arrival_batches, route_batches


def prompt_profiles(model, ids: list[list[int]]) -> np.ndarray:
    """f32[P, L·E]: the fraction of each prompt's tokens routed to each (layer, expert), from one resident forward
    pass per prompt (what prefill computes anyway; a trained predictor's scores can be given instead)."""
    from ef_jax.engine.forward import trace_routing
    cfg = model.config
    L, E = cfg.num_moe_layers, cfg.num_experts
    out = np.zeros((len(ids), L * E), np.float32)
    for p, seq in enumerate(ids):
        route = trace_routing(model, [seq])                                               # [T, L, K]
        hot = np.zeros((len(route), L, E), np.float32)
        np.put_along_axis(hot, route.astype(np.int64), 1.0, axis=-1)
        out[p] = hot.mean(0).reshape(-1)
    return out


def generate_scheduled(model, prompts, *, batch_size: int, schedule: str = "route",
                       profiles: np.ndarray | None = None, **generate_kw: Any):
    """ef_jax.generate over `prompts` in batches of at most `batch_size`, grouped by `schedule`:
    "route" (prompts with overlapping routes together; `profiles` f32[P, L·E] or prompt_profiles) or "arrival".
    Returns a GenerationResult with tokens/texts in the input order and stats["batches"] (prompt indices)."""
    import ef_jax
    from ef_jax.engine.generate import GenerationResult
    ids, _ = normalize_prompts(prompts, model.tokenizer, model.config.vocab_size)
    if schedule == "route":
        t0 = time.perf_counter()
        prof = prompt_profiles(model, ids) if profiles is None else np.asarray(profiles, np.float32)
        if prof.shape[0] != len(ids):
            raise ValueError(f"profiles has {prof.shape[0]} rows for {len(ids)} prompts")
        batches, schedule_s = route_batches(prof, batch_size), time.perf_counter() - t0
    elif schedule == "arrival":
        batches, schedule_s = arrival_batches(len(ids), batch_size), 0.0
    else:
        raise ValueError(f"schedule={schedule!r}: use 'route' or 'arrival'")
    tokens: list = [None] * len(ids)
    texts: list | None = [None] * len(ids) if model.tokenizer is not None else None
    per_batch = []
    for batch in batches:
        res = ef_jax.generate(model, [ids[i] for i in batch], **generate_kw)
        for row, i in enumerate(batch):
            tokens[i] = res.tokens[row]
            if texts is not None:
                texts[i] = res.texts[row]
        per_batch.append(res.stats)
    stats = {"batches": batches, "schedule": schedule, "schedule_s": schedule_s, "per_batch": per_batch}
    for key in ("hits", "misses", "h2d_bytes", "stall_s", "generated_tokens"):
        if all(key in s for s in per_batch):
            stats[key] = sum(s[key] for s in per_batch)
    return GenerationResult(tokens=tokens, texts=texts, stats=stats)
