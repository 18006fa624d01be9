"""The decode loop: rows of tokens stepped through a Forward with an explicit KV cache — the only one in ef_jax.

Rows(forward, B, S) holds the KV cache and validity mask of B rows with S cache slots; `advance(tokens,
positions, real)` writes the new tokens' keys/values at the next slots, runs the forward (one sync point per
MoE layer when offloaded) and returns the head's logits. The modes are thin drivers over it:

  sample          prefill the left-padded prompts, then one sampled token per row per step, stop at EOS/stop ids
                  (ef_jax.generate)
  continuous      rows that join and leave at step boundaries: each prompt prefilled alone (`prefill`, the program
                  `sample` runs), its KV row spliced into a pool, one step over the rows a scheduler picks
                  (ef_jax.engine.loop.continuous, `ef-jax serve`)
  teacher_forced  one given token per row per step: log p(next token) and the greedy choice (eval-policy)
  record          one prefill per chunk with a hidden-state tap: hidden states and routing (hybrid training data)
  full            one pass over whole sequences: logits of every position and the routing (logits, trace)

Axes: B rows, T tokens per call, S cache slots, V vocabulary, L MoE layers, K top-k, D model.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from ef_jax.engine.loop.batch import PromptBatch
from ef_jax.engine.telemetry.compile_time import CompileTimer
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.penalty import SeenTokens, apply_repetition_penalty
from ef_jax.engine.loop.sampling import SamplingParams, sample, step_key
from ef_jax.models.transformer import head, init_cache


class Rows:
    """B rows sharing one write position: row b's real tokens are where `valid[b]` is True."""

    def __init__(self, forward: Forward, batch: int, slots: int):
        cfg, params = forward.cfg, forward.model.params
        self.forward, self.cfg, self.params = forward, cfg, params
        self.cache = forward.model.place(init_cache(cfg, batch, slots, params["embed"].dtype))
        self.valid = np.zeros((batch, slots), bool)  # bool[B, S]: which cache slots hold real tokens
        self.next_slot = 0

    def advance(self, tokens: np.ndarray, positions: np.ndarray, real: np.ndarray | None = None, *,
                all_logits: bool = False, tap: Callable | None = None):
        """tokens, positions i32[B, T]; real bool[B, T] (default all) → (logits f32[B, V] of the last position,
        or [B, T, V] with all_logits; routings per layer)."""
        B, T = tokens.shape
        w = self.next_slot
        self.valid[:, w:w + T] = True if real is None else real
        x, self.cache, routings = self.forward(tokens, positions, w, self.valid, self.cache, tap=tap)
        self.next_slot = w + T
        return head(self.cfg, self.params, x, last_only=not all_logits), routings


def prefill(forward: Forward, batch: PromptBatch):
    """The prompts' first step: (Rows holding their KV cache, logits f32[B, V] of each row's last prompt token,
    routings per layer). ef_jax.generate and the continuous-batching pool both start a prompt here, so a prompt
    that joins a running batch computes exactly what it computes alone."""
    rows = Rows(forward, batch.tokens.shape[0], batch.cache_slots)
    logits, routings = rows.advance(batch.tokens, batch.positions, batch.valid)
    return rows, logits, routings


def sample_rows(forward: Forward, batch: PromptBatch, sp: SamplingParams, seed: int, stops: set[int],
                max_new: int, on_token: Callable[[int, int], object] | None = None,
                repetition_penalty: float = 1.0) -> tuple[list[list[int]], dict]:
    """Prefill + sampled decode. Returns (generated ids per row, a stop id included when hit; timing stats).

    on_token(row, token_id) is called for every generated token as soon as it is sampled; a true return value
    ends that row there (the token is kept). repetition_penalty > 1 discourages tokens the row already holds.
    Timing: compile time goes to compile_s; a decode step that compiled a new shape is not steady state and goes
    to warmup_s; tokens_per_s counts only the steps that compiled nothing."""
    B, P = batch.tokens.shape
    cfg = forward.cfg
    key = None if sp.greedy else jax.random.key(seed)  # greedy draws nothing: no key, no seeding program
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    seen = SeenTokens(batch.tokens, batch.valid, cfg.vocab_size) if repetition_penalty != 1.0 else None

    def next_token(logits, step: int) -> np.ndarray:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen.mask, np.float32(repetition_penalty))
        step_k = None if sp.greedy else step_key(key, step)
        return forward.counters.to_host("sample", sample(logits, step_k, sp))

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
        rows, logits, _ = prefill(forward, batch)
        tok = next_token(logits, 0)
        prefill_s = time.perf_counter() - t0
        prefill_compile_s = compiling.seconds
        emit(tok)  # untimed: a streaming callback's printing is not compute
        steps, decode_s, warm_steps, warmup_s = 0, 0.0, 0, 0.0
        for step in range(1, max_new):
            if done.all():
                break
            positions = (batch.lengths + step - 1)[:, None]
            c0, t1 = compiling.seconds, time.perf_counter()
            logits, _ = rows.advance(tok[:, None], positions)
            tok = next_token(logits, step)
            dt, dc = time.perf_counter() - t1, compiling.seconds - c0
            if dc > 0:
                warm_steps, warmup_s = warm_steps + 1, warmup_s + dt - dc
            else:
                steps, decode_s = steps + 1, decode_s + dt
            emit(tok)
        compile_s = compiling.seconds
    # every decode step compiled (a short run): no steady-state step, so no speed (tokens_per_s NaN, "n/a" in the
    # CLI) rather than one that times compiles (4 tokens read as 0.6 tokens/s for a 943 tokens/s model)
    decoded = steps * B
    stats = {"compile_s": compile_s, "prefill_s": prefill_s - prefill_compile_s, "decode_s": decode_s,
             "warmup_s": warmup_s, "tokens_per_s": decoded / decode_s if decode_s > 0 else float("nan"),
             "prompt_tokens": int(batch.lengths.sum()), "generated_tokens": sum(len(o) for o in out),
             "decoded_tokens": decoded, "batch_size": B}
    return out, stats


def teacher_forced(forward: Forward, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """seqs i32[B, T] → (nll f32[B, T-1], argmax i32[B, T-1]), one given token per row per step."""
    B, T = seqs.shape
    rows = Rows(forward, B, T)
    nll = np.zeros((B, T - 1), np.float32)
    am = np.zeros((B, T - 1), np.int32)
    for t in range(T - 1):
        logits, _ = rows.advance(seqs[:, t:t + 1], np.full((B, 1), t, np.int32))
        logits = forward.counters.to_host("logits", logits).astype(np.float64)  # [B, V]
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll[:, t] = -logp[np.arange(B), seqs[:, t + 1]]
        am[:, t] = logits.argmax(axis=-1)
    return nll, am


def full(forward: Forward, tokens: np.ndarray, *, all_logits: bool = True, tap: Callable | None = None):
    """One pass over whole sequences tokens i32[B, T] → (logits f32[B, T, V] (device), experts i32[T·B, L, K]
    routed per token and MoE layer, host numpy)."""
    B, T = tokens.shape
    rows = Rows(forward, B, T)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    logits, routings = rows.advance(tokens, positions, all_logits=all_logits, tap=tap)
    moe = forward.cfg.moe_layer_ids
    experts = (np.stack([forward.counters.to_host("routing", routings[i].experts) for i in moe], axis=1)
               if moe else np.zeros((B * T, 0, forward.cfg.top_k), np.int32))
    return logits, experts


def record(forward: Forward, chunks: list[list[int]], point: str) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk as its own sequence, hidden states tapped at `point` ("moe": layer outputs, "attention": MoE
    inputs). Because the model is causal, position t's hidden state and routing in a prefill are those a
    token-by-token decode of the same text sees. Returns (hidden f16[N, L, D], experts i32[N, L, K])."""
    hidden, experts = [], []
    for c in chunks:
        seen: list[np.ndarray] = []

        def tap(j, where, h):
            if where == point:
                seen.append(np.asarray(forward.counters.to_host("hidden", h)[0], np.float16))  # [T, D]

        _, ex = full(forward, np.asarray([c], np.int32), all_logits=False, tap=tap)
        hidden.append(np.stack(seen, axis=1))
        experts.append(ex)
    return np.concatenate(hidden), np.concatenate(experts)
