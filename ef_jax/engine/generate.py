"""ef_jax.generate: prefill + token-by-token decode with an explicit KV cache, sampling and stop tokens.

prompts → tokenize → left-padded batch → prefill (all prompt tokens, one pass) → sample
        → repeat: decode one token per row (forward over layer groups) → sample → stop at EOS / stop ids

The loop is shared by all-resident and offloaded decoding: only the forward object differs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from ef_jax.engine.batch import make_batch, normalize_prompts
from ef_jax.engine.forward import DEFAULT_LAYERS_PER_GROUP, ResidentForward
from ef_jax.engine.sampling import SamplingParams, sample
from ef_jax.model import Model
from ef_jax.models.transformer import head, init_cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]        # generated ids per prompt (prompt excluded; a stop token, if hit, included)
    texts: list[str] | None        # decoded generations, when the model has a tokenizer
    stats: dict[str, Any]          # prefill_s, decode_s, tokens_per_s, ... (+ offload telemetry)


def _stop_ids(model: Model, stop_token_ids: Sequence[int] | None) -> set[int]:
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


def _make_forward(model: Model, offload, layers_per_group: int):
    if offload is None:
        return ResidentForward(model, layers_per_group)
    from ef_jax.offload.engine import OffloadForward  # the offload engine (own module)
    return OffloadForward(model, offload)


def generate(model: Model, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int = 0, offload=None, stop_token_ids: Sequence[int] | None = None,
             layers_per_group: int = DEFAULT_LAYERS_PER_GROUP, batch_size: int | None = None,
             schedule: str = "arrival") -> GenerationResult:
    """Generates up to max_new_tokens per prompt.

    Args:
      prompts: a str, a list of str (needs the model's tokenizer), or a list of lists of token ids.
      temperature: 0 → greedy; otherwise sample with top_k / top_p from a PRNG seeded by `seed`.
      offload: None (every expert resident) or an ef_jax.OffloadConfig.
      stop_token_ids: extra ids that end a row (EOS from the config / tokenizer always does).
      batch_size / schedule: decode at most batch_size prompts together, grouped in input order ("arrival") or by
        overlapping expert routes ("route", ef_jax.sched.generate); outputs stay in input order.
    Returns: GenerationResult(tokens, texts, stats).
    """
    if batch_size is None and schedule != "arrival":
        raise ValueError(f"schedule={schedule!r} chooses which prompts share a batch: give batch_size too")
    if batch_size is not None:
        from ef_jax.sched.generate import generate_scheduled
        return generate_scheduled(model, prompts, batch_size=batch_size, schedule=schedule,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, offload=offload, stop_token_ids=stop_token_ids,
                                  layers_per_group=layers_per_group)
    if not isinstance(model, Model):
        raise TypeError(f"model must be an ef_jax.Model (from ef_jax.load), got {type(model).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    sp = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
    ids, _ = normalize_prompts(prompts, model.tokenizer, model.config.vocab_size)
    stops = _stop_ids(model, stop_token_ids)
    forward = _make_forward(model, offload, layers_per_group)
    batch = make_batch(ids, max_new_tokens)
    tokens, stats = _decode(model, forward, batch, sp, seed, stops, max_new_tokens)
    if hasattr(forward, "stats"):
        stats.update(forward.stats())
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationResult(tokens=tokens, texts=texts, stats=stats)


def _decode(model: Model, forward, batch, sp: SamplingParams, seed: int, stops: set[int], max_new: int):
    cfg = model.config
    B, P, S = batch.tokens.shape[0], batch.prompt_slots, batch.cache_slots
    cache = init_cache(cfg, B, S, model.params["embed"].dtype)
    valid = np.zeros((B, S), bool)
    valid[:, :P] = batch.valid
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)

    def emit(tok: np.ndarray):
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
                done[b] = int(tok[b]) in stops

    t0 = time.perf_counter()
    x, cache, _ = forward(batch.tokens, batch.positions, 0, valid, cache)
    tok = np.asarray(sample(head(cfg, model.params, x, last_only=True), jax.random.fold_in(key, 0), sp))
    emit(tok)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = 0
    for step in range(1, max_new):
        if done.all():
            break
        slot = P + step - 1
        valid[:, slot] = True
        positions = (batch.lengths + step - 1)[:, None]
        x, cache, _ = forward(tok[:, None], positions, slot, valid, cache)
        tok = np.asarray(sample(head(cfg, model.params, x, last_only=True), jax.random.fold_in(key, step), sp))
        emit(tok)
        steps += 1
    decode_s = time.perf_counter() - t1
    decoded = steps * B
    stats = {"prefill_s": prefill_s, "decode_s": decode_s,
             "tokens_per_s": decoded / decode_s if decode_s > 0 else float("nan"),
             "prompt_tokens": int(batch.lengths.sum()), "generated_tokens": sum(len(o) for o in out),
             "batch_size": B}
    return out, stats
