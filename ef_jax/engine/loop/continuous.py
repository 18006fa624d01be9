"""Continuous batching over the one decode loop: requests join and leave a pool of rows at step boundaries.

[prompt] → decode.prefill alone (B=1: the program ef_jax.generate runs) → splice its KV row into a free pool row,
right-aligned to the pool's write slot → step: Rows.advance over every pool row, `real` only for the rows the
caller picks (the others leave a hole: an invalid slot) → sample each picked row with its own key and step
→ free (EOS, stop, max_tokens, disconnect: the row's slots become invalid) → repack (a per-row gather that squeezes
the holes out and right-aligns every row) when the write slot reaches the end of the cache or a joiner needs room

Positions are explicit (RoPE never sees a slot index) and attention reads only valid slots, so where a row's tokens
sit in the cache, its holes and the other rows change nothing but summation order. A sliding window counts slots,
so for a model with one the pool repacks before any step that would read across a hole.

The skipped rows still run through the dense layers (their outputs are dropped): what the token scheduler saves is
expert bytes, since an offloaded MoE layer loads only the union of the picked (`real`) rows' experts.

Axes: R pool rows, S cache slots, P prompt slots of a prefill, V vocabulary, L MoE layers, E experts, K top-k.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.engine.loop.batch import make_batch
from ef_jax.engine.loop.decode import Rows, prefill
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.sampling import SamplingParams, sample, step_key
from ef_jax.models.transformer import KVCache


@functools.partial(jax.jit, donate_argnums=(0,))
def splice_row(dst: tuple, src: tuple, row: jax.Array, index: jax.Array, mask: jax.Array) -> tuple:
    """Copies one prefilled row into a pool row. dst: per layer {name: [R, S, ...]}; src: the same tree of
    [1, S_p, ...]; row i32[]; index i32[S]: the src slot each dst slot takes; mask bool[S]: which dst slots take it
    (the others keep what they hold). Returns dst with row `row` replaced where mask."""
    def one(d, s):
        taken = jnp.take(s[0], index, axis=0).astype(d.dtype)            # [S, ...]
        m = mask.reshape((-1,) + (1,) * (d.ndim - 2))
        return d.at[row].set(jnp.where(m, taken, d[row]))
    return jax.tree.map(one, dst, src)


@functools.partial(jax.jit, donate_argnums=(0,))
def repack_rows(layers: tuple, index: jax.Array) -> tuple:
    """new[b, s] = old[b, index[b, s]] in every layer's cache ([R, S, ...] leaves); index i32[R, S]."""
    def one(x):
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)
    return jax.tree.map(one, layers)


def repack_index(valid: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """valid bool[R, S] → (index i32[R, S], new valid bool[R, S]): each row's valid slots, in order, moved to end at
    slot target-1 (holes squeezed out). Raises RuntimeError if a row holds more than `target` tokens."""
    R, S = valid.shape
    if not 0 <= target <= S:
        raise ValueError(f"target={target} must lie in [0, {S}]")
    index = np.zeros((R, S), np.int32)
    new = np.zeros((R, S), bool)
    for b in range(R):
        v = np.flatnonzero(valid[b])
        if len(v) > target:
            raise RuntimeError(f"repack to slot {target}: row {b} holds {len(v)} tokens (counts "
                               f"{valid.sum(1).tolist()})")
        index[b, target - len(v):target] = v
        new[b, target - len(v):target] = True
    return index, new


def expert_sets(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """routes i[B, L, K] (each row's experts at every MoE layer) → f32[B, L·E] 0/1 sets (TokenScheduler.pick)."""
    B, L, _ = routes.shape
    hot = np.zeros((B, L, num_experts), np.float32)
    np.put_along_axis(hot, routes.astype(np.int64), 1.0, axis=-1)
    return hot.reshape(B, L * num_experts)


def resident_experts(forward: Forward) -> np.ndarray | None:
    """f32[L·E]: 1 where the offloaded expert cache holds the expert now (None when every expert is resident)."""
    if not forward.offloaded:
        return None
    rows = [forward.source.resident_row(j) for j in range(len(forward.cfg.moe_layer_ids))]
    return np.concatenate(rows).astype(np.float32)


class RowPool:
    """R rows of one KV cache with S slots over one Forward (one expert cache): join, step, sample, free.

    Args:
      forward: the Forward every prefill and step runs through.
      rows: R, requests that can hold a KV cache at once.
      slots: S, cache slots per row: a request's prompt tokens + max new tokens must fit.
    """

    def __init__(self, forward: Forward, rows: int, slots: int):
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r} must be a positive int")
        if not isinstance(slots, int) or slots < 2:
            raise ValueError(f"slots={slots!r} must be an int ≥ 2 (a prompt token and a new one)")
        self.forward, self.cfg = forward, forward.cfg
        self.rows = Rows(forward, rows, slots)
        self.R, self.S = rows, slots
        self.live = np.zeros(rows, bool)            # bool[R]: the row belongs to a request
        self.window = any(w is not None for w in self.cfg.sliding_windows)
        self.holes = False                          # some live row skipped a step since the last repack
        self.repacks = 0

    # ---- rows ------------------------------------------------------------------------------------------------
    def free_rows(self) -> list[int]:
        return np.flatnonzero(~self.live).tolist()

    def counts(self) -> np.ndarray:
        """i[R]: tokens each row holds in the cache."""
        return self.rows.valid.sum(1)

    def free(self, row: int) -> None:
        """The row's slots become invalid at once: the next step neither reads nor computes for it."""
        if not self.live[row]:
            raise RuntimeError(f"free({row}): the row is not live (live rows {np.flatnonzero(self.live).tolist()})")
        self.live[row] = False
        self.rows.valid[row] = False

    def _repack(self, target: int) -> None:
        index, valid = repack_index(self.rows.valid, target)
        layers = repack_rows(self.rows.cache.layers, jnp.asarray(index))
        self.rows.cache = KVCache(layers=layers, valid=jnp.asarray(valid))
        self.rows.valid, self.rows.next_slot = valid, target
        self.holes = False
        self.repacks += 1

    # ---- join / step -----------------------------------------------------------------------------------------
    def join(self, ids: Sequence[int], max_new: int):
        """Prefills `ids` alone (exactly as ef_jax.generate(max_new_tokens=max_new) does) and splices its KV into a
        free row. Returns (row, logits f32[1, V] of the last prompt token (device), routings per layer of the
        prefill: experts [P, K] for MoE layers)."""
        L = len(ids)
        if L < 1 or L + max_new > self.S:
            raise ValueError(f"a prompt of {L} tokens + max_new={max_new} must fit the pool's {self.S} slots")
        free = self.free_rows()
        if not free:
            raise RuntimeError("join: every pool row is live (check free_rows() first)")
        r = free[0]
        batch = make_batch([list(ids)], max_new)
        prow, logits, routings = prefill(self.forward, batch)
        if self.rows.next_slot < L:                 # make room on the left: right-align every row at slot L
            self._repack(max(L, int(self.counts().max())))
        w, P = self.rows.next_slot, batch.prompt_slots
        index = np.zeros(self.S, np.int32)
        mask = np.zeros(self.S, bool)
        index[w - L:w] = np.arange(P - L, P)
        mask[w - L:w] = True
        layers = splice_row(self.rows.cache.layers, prow.cache.layers, jnp.int32(r), jnp.asarray(index),
                            jnp.asarray(mask))
        self.rows.valid[r] = mask
        self.rows.cache = KVCache(layers=layers, valid=jnp.asarray(self.rows.valid))
        self.live[r] = True
        return r, logits, routings

    def step(self, picked: Sequence[int], tokens: np.ndarray, positions: np.ndarray):
        """One decode step: picked rows write tokens[r] at position positions[r]; every other row writes a hole.
        tokens, positions i[R]. Returns (logits f32[R, V] (device; only picked rows mean anything), routings)."""
        picked = list(picked)
        if not picked or not self.live[picked].all():
            raise RuntimeError(f"step: picked rows {picked} must be live (live {np.flatnonzero(self.live).tolist()})")
        if self.rows.next_slot >= self.S or (self.window and self.holes):
            self._repack(int(self.counts().max()))
        real = np.zeros((self.R, 1), bool)
        real[picked] = True
        tok = np.asarray(tokens, np.int32).reshape(self.R, 1)
        pos = np.where(real, np.asarray(positions, np.int32).reshape(self.R, 1), 0)
        logits, routings = self.rows.advance(tok, pos, real)
        self.holes |= len(picked) < int(self.live.sum())
        return logits, routings

    # ---- sampling and routes (the named sync points) ---------------------------------------------------------
    def sample(self, logits, rows: Sequence[int], params: Sequence[SamplingParams], seeds: Sequence[int],
               steps: Sequence[int]) -> np.ndarray:
        """i32[n]: row rows[i]'s next token, as ef_jax.generate(seed=seeds[i]) samples its steps[i]-th token
        alone: greedy rows share one argmax; a sampled row draws from fold_in(key(seed), step) over its own logits."""
        out = np.zeros(len(rows), np.int32)
        greedy = [i for i, sp in enumerate(params) if sp.greedy]
        if greedy:
            top = self.forward.counters.to_host("sample", sample(logits, None, SamplingParams()))
            out[greedy] = top[[rows[i] for i in greedy]]
        for i, sp in enumerate(params):
            if not sp.greedy:
                key = step_key(jax.random.key(seeds[i]), steps[i])
                r = rows[i]
                out[i] = self.forward.counters.to_host("sample", sample(logits[r:r + 1], key, sp))[0]
        return out

    def last_routes(self, routings, batch: int) -> np.ndarray:
        """i32[batch, L, K]: the experts each row's last token was routed to, from a call's routings (experts
        [batch·T, K] per MoE layer): one sync ("routing") for every MoE layer together."""
        moe = self.cfg.moe_layer_ids
        if not moe:
            return np.zeros((batch, 0, self.cfg.top_k), np.int32)
        ex = self.forward.counters.to_host("routing", jnp.stack([routings[i].experts for i in moe]))  # [L, N, K]
        L, N, K = ex.shape
        return ex.reshape(L, batch, N // batch, K)[:, :, -1].transpose(1, 0, 2)
