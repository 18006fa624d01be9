"""ef_jax.generate: prefill + token-by-token decode with an explicit KV cache, sampling and stop tokens.

prompts → tokenize → left-padded batch → prefill (all prompt tokens, one pass) → sample
        → repeat: decode one token per row (forward over layer groups) → sample → stop at EOS / stop ids

The loop is shared by all-resident and offloaded decoding: only the forward object differs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ef_jax.engine.batch import make_batch, normalize_prompts
from ef_jax.engine.compile_time import CompileTimer
from ef_jax.engine.forward import DEFAULT_LAYERS_PER_GROUP, ResidentForward
from ef_jax.engine.penalty import SeenTokens, apply_repetition_penalty
from ef_jax.engine.request import check_context
from ef_jax.engine.sampling import SamplingParams, sample
from ef_jax.engine.stats import add_real_bytes, merge_batch_stats, strip_schedule_keys, with_schedule_keys
from ef_jax.generation_config import resolve_sampling
from ef_jax.model import Model
from ef_jax.models.transformer import head, init_cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]        # generated ids per prompt (prompt excluded; a stop token, if hit, included)
    texts: list[str] | None        # decoded generations, when the model has a tokenizer
    stats: dict[str, Any]          # compile_s, prefill_s, decode_s, tokens_per_s, ... (+ offload telemetry)


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


def generate(model: Model, prompts, *, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int = 0, offload=None, stop_token_ids: Sequence[int] | None = None,
             layers_per_group: int = DEFAULT_LAYERS_PER_GROUP, batch_size: int | None = None,
             schedule: str = "arrival", on_token: Callable[[int, int], Any] | None = None) -> GenerationResult:
    """Generates up to max_new_tokens per prompt.

    Args:
      prompts: a str, a list of str (needs the model's tokenizer), or a list of lists of token ids.
      max_new_tokens, temperature, top_k, top_p, repetition_penalty: None takes the checkpoint's
        generation_config.json value (model.generation), else 64 / greedy / no top-k / 1.0 / 1.0
        (ef_jax.generation_config). temperature 0 → greedy; otherwise sample with top_k (0 = off) / top_p from a
        PRNG seeded by `seed`. repetition_penalty > 1 discourages tokens already in the row (prompt included).
      offload: None (every expert resident) or an ef_jax.OffloadConfig.
      stop_token_ids: extra ids that end a row (EOS from the config / tokenizer always does).
      batch_size / schedule: decode at most batch_size prompts together, grouped in input order ("arrival") or by
        overlapping expert routes ("route", ef_jax.sched.generate); outputs stay in input order.
      on_token: called as on_token(row, token_id) on the host as each token is sampled (row = the prompt's index),
        e.g. to stream text; a true return value ends that row there (the token is kept). Not with batch_size.
    Returns: GenerationResult(tokens, texts, stats); stats has the same keys with or without batch_size
      (ef_jax.engine.stats). The prompt + max_new_tokens must fit in the model's max_position_embeddings.
    """
    if batch_size is None and schedule != "arrival":
        raise ValueError(f"schedule={schedule!r} chooses which prompts share a batch: give batch_size too")
    if not isinstance(model, Model):
        raise TypeError(f"model must be an ef_jax.Model (from ef_jax.load), got {type(model).__name__}")
    req = resolve_sampling(model.generation, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty)
    sp = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
    ids, _ = normalize_prompts(prompts, model.tokenizer, model.config.vocab_size)
    check_context(model.config, [len(p) for p in ids], req.max_new_tokens)  # before any device work
    if batch_size is not None:
        if on_token is not None:
            raise ValueError("on_token= streams the rows of one batch: it cannot be combined with batch_size= yet; "
                             "drop batch_size to stream")
        from ef_jax.sched.generate import generate_scheduled
        res = generate_scheduled(model, ids, batch_size=batch_size, schedule=schedule, **req.kwargs(), seed=seed,
                                 offload=offload, stop_token_ids=stop_token_ids, layers_per_group=layers_per_group)
        s = res.stats
        res.stats = merge_batch_stats([strip_schedule_keys(b) for b in s["per_batch"]], s["batches"], s["schedule"],
                                      s["schedule_s"])
        return res
    stops = _stop_ids(model, stop_token_ids)
    forward = _make_forward(model, offload, layers_per_group)
    batch = make_batch(ids, req.max_new_tokens)
    tokens, stats = _decode(model, forward, batch, sp, seed, stops, req.max_new_tokens, req.repetition_penalty,
                            on_token)
    if hasattr(forward, "stats"):
        stats.update(forward.stats())
        add_real_bytes(stats, model.param_bytes()["per_expert"])
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return GenerationResult(tokens=tokens, texts=texts, stats=with_schedule_keys(stats, len(ids)))


def _decode(model: Model, forward, batch, sp: SamplingParams, seed: int, stops: set[int], max_new: int,
            repetition_penalty: float = 1.0, on_token=None):
    cfg = model.config
    B, P, S = batch.tokens.shape[0], batch.prompt_slots, batch.cache_slots
    cache = init_cache(cfg, B, S, model.params["embed"].dtype)
    valid = np.zeros((B, S), bool)
    valid[:, :P] = batch.valid
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    seen = SeenTokens(batch.tokens, batch.valid, cfg.vocab_size) if repetition_penalty != 1.0 else None

    def next_token(x, step: int) -> np.ndarray:
        logits = head(cfg, model.params, x, last_only=True)
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen.mask, np.float32(repetition_penalty))
        return np.asarray(sample(logits, jax.random.fold_in(key, step), sp))

    def emit(tok: np.ndarray):
        for b in range(B):
            if not done[b]:
                t = int(tok[b])
                out[b].append(t)
                done[b] = t in stops
                if seen is not None:
                    seen.add(b, t)
                if on_token is not None and on_token(b, t):
                    done[b] = True

    with CompileTimer() as compiling:
        t0 = time.perf_counter()
        x, cache, _ = forward(batch.tokens, batch.positions, 0, valid, cache)
        tok = next_token(x, 0)
        prefill_s = time.perf_counter() - t0
        prefill_compile_s = compiling.seconds
        emit(tok)  # untimed: a streaming callback's printing is not compute
        # A decode step that compiled a new shape is not steady state even without its compile time (first
        # dispatch, executable load): it goes to warmup_s; tokens_per_s counts the steps that compiled nothing.
        steps, decode_s, warm_steps, warmup_s = 0, 0.0, 0, 0.0
        for step in range(1, max_new):
            if done.all():
                break
            slot = P + step - 1
            valid[:, slot] = True
            positions = (batch.lengths + step - 1)[:, None]
            c0, t1 = compiling.seconds, time.perf_counter()
            x, cache, _ = forward(tok[:, None], positions, slot, valid, cache)
            tok = next_token(x, step)
            dt, dc = time.perf_counter() - t1, compiling.seconds - c0
            if dc > 0:
                warm_steps, warmup_s = warm_steps + 1, warmup_s + dt - dc
            else:
                steps, decode_s = steps + 1, decode_s + dt
            emit(tok)
        compile_s = compiling.seconds
    if steps == 0:  # every decode step compiled: report them rather than nothing
        steps, decode_s, warm_steps, warmup_s = warm_steps, warmup_s, 0, 0.0
    decoded = steps * B
    stats = {"compile_s": compile_s, "prefill_s": prefill_s - prefill_compile_s, "decode_s": decode_s,
             "warmup_s": warmup_s, "tokens_per_s": decoded / decode_s if decode_s > 0 else float("nan"),
             "prompt_tokens": int(batch.lengths.sum()), "generated_tokens": sum(len(o) for o in out),
             "decoded_tokens": decoded, "batch_size": B}
    return out, stats
