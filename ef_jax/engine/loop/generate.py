"""ef_jax.generate: prefill + token-by-token decode with an explicit KV cache, sampling and stop tokens.

prompts → tokenize → checks (context length) → [batch_size: batches in arrival order, or by overlapping routes
(ef_jax.sched)] → per batch: left-padded rows → engine.decode.sample_rows over ONE Forward → outputs in input order

Resident and offloaded decoding are the same loop over the same Forward; only its expert source differs. With
batch_size, every batch runs through the same Forward, so one expert cache (and its slots) serves them all.
Sampling settings the caller leaves as None come from the checkpoint's generation_config.json
(ef_jax.generation_config), as in transformers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from ef_jax.engine.loop.batch import cache_slots, make_batch, normalize_prompts
from ef_jax.engine.loop.decode import full, sample_rows
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.request import check_context
from ef_jax.engine.loop.sampling import SamplingParams
from ef_jax.engine.loop.stats import merge_batch_stats
from ef_jax.generation_config import resolve_sampling
from ef_jax.model import Model
from ef_jax.sched.route_scheduler import arrival_batches, route_batches, routing_profile

SCHEDULES = ("arrival", "route")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]        # generated ids per prompt (prompt excluded; a stop token, if hit, included)
    texts: list[str] | None        # decoded generations, when the model has a tokenizer
    stats: dict[str, Any]          # compile_s, prefill_s, decode_s, tokens_per_s, ... (+ offload telemetry)


def stop_ids(model: Model, stop_token_ids: Sequence[int] | None) -> set[int]:
    """The ids that end a row: the config's EOS ids, the tokenizer's, and `stop_token_ids` (checked in range)."""
    ids = set(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    if stop_token_ids is not None:
        for t in stop_token_ids:
            if not 0 <= int(t) < model.config.vocab_size:
                raise ValueError(f"stop_token_ids contains {t}, outside the vocabulary [0, {model.config.vocab_size})")
        ids |= {int(t) for t in stop_token_ids}
    return ids


def _check_plan(batch_size: int | None, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use 'route' or 'arrival'")
    if batch_size is None and schedule != "arrival":
        raise ValueError(f"schedule={schedule!r} chooses which prompts share a batch: give batch_size too")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")


def _plan(forward: Forward, ids: list[list[int]], batch_size: int | None, schedule: str):
    """(batches of prompt indices, seconds spent planning). Route profiles come from one pass per prompt through
    the same Forward (its expert source: an offloaded run never uploads every expert to profile)."""
    if batch_size is None:
        return [list(range(len(ids)))], 0.0
    if schedule == "arrival":
        return arrival_batches(len(ids), batch_size), 0.0
    t0 = time.perf_counter()
    E = forward.cfg.num_experts
    prof = np.stack([routing_profile(full(forward, np.asarray([seq], np.int32), all_logits=False)[1], E)
                     for seq in ids])
    return route_batches(prof, batch_size), time.perf_counter() - t0


def generate(model: Model, prompts, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int = 0, offload=None, stop_token_ids: Sequence[int] | None = None,
             layers_per_group: int | None = None, batch_size: int | None = None, schedule: str = "arrival",
             on_token: Callable[[int, int], Any] | None = None) -> GenerationResult:
    """Generates up to max_new_tokens per prompt.

    Args:
      prompts: a str, a list of str (needs the model's tokenizer), or a list of lists of token ids.
      max_new_tokens, temperature, top_k, top_p, repetition_penalty: None takes the checkpoint's
        generation_config.json value (model.generation), else 64 / greedy / no top-k / 1.0 / 1.0
        (ef_jax.generation_config). temperature 0 → greedy; otherwise sample with top_k (0 = off) / top_p from a
        PRNG seeded by `seed`. repetition_penalty > 1 discourages tokens already in the row (prompt included).
      offload: None (every expert resident) or an ef_jax.OffloadConfig.
      stop_token_ids: extra ids that end a row (EOS from the config / tokenizer always does).
      layers_per_group: layers per jitted group (default: offload.layers_per_group, else 4); applies to both modes.
      batch_size / schedule: decode at most batch_size prompts together, grouped in input order ("arrival") or by
        overlapping expert routes ("route"); outputs stay in input order, and one expert cache serves every batch.
        Greedy outputs are each prompt's own; sampled rows draw from one PRNG stream per batch.
      on_token: called as on_token(prompt index, token_id) on the host as each token is sampled, e.g. to stream
        text; a true return value ends that prompt there (the token is kept).
    Returns: GenerationResult(tokens, texts, stats); stats has the same keys with or without batch_size
      (ef_jax.engine.loop.stats). The prompt + max_new_tokens must fit in the model's max_position_embeddings.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be an ef_jax.Model (from ef_jax.load), got {type(model).__name__}")
    req = resolve_sampling(model.generation, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty)
    sp = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
    ids, _ = normalize_prompts(prompts, model.tokenizer, model.config.vocab_size)
    check_context(model.config, [len(p) for p in ids], req.max_new_tokens)  # before any device work
    _check_plan(batch_size, schedule)
    stops = stop_ids(model, stop_token_ids)
    # the largest KV cache of any batch: what expert_memory="auto" leaves room for
    kv_shape = (min(batch_size or len(ids), len(ids)), cache_slots(max(map(len, ids)), req.max_new_tokens))
    with Forward(model, offload, layers_per_group=layers_per_group, kv_shape=kv_shape) as forward:
        batches, schedule_s = _plan(forward, ids, batch_size, schedule)
        tokens: list = [None] * len(ids)
        per_batch = []
        for batch in batches:
            emit = None if on_token is None else (lambda row, t, batch=batch: on_token(batch[row], t))
            out, st = sample_rows(forward, make_batch([ids[i] for i in batch], req.max_new_tokens), sp, seed, stops,
                                  req.max_new_tokens, emit, req.repetition_penalty)
            for row, i in enumerate(batch):
                tokens[i] = out[row]
            per_batch.append(st)
        stats = merge_batch_stats(per_batch, batches, schedule if batch_size is not None else "arrival", schedule_s)
        stats.update(forward.stats())  # one Forward served every batch: its counters are the run's
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationResult(tokens=tokens, texts=texts, stats=stats)
