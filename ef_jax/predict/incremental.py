"""The routing-path predictor decoded one token at a time with a key/value cache: what the predictive policy runs
before every step.

[token id of each row] → Vocab (+ trigram hashes) → embed + previous route → per block: LayerNorm → q, k, v of
the new position → k, v into the row's ring of the last T positions → ALiBi attention over the ring → MLP
→ LayerNorm → head → logits f32[B, L, E]

Axes: B rows, T context window (ring size), H heads, hd head width, D model width, L MoE layers, E experts per
layer, K routed experts per token, N blocks (depth).

The full-window stepper (PathStepPredictor) re-runs the whole window of T positions for every token: O(T) work
per block where one position's is enough. Here each block keeps the keys and values of the row's last T
positions, so a step costs one position. ALiBi scores depend only on the distance between positions, so a ring
buffer indexed by absolute position gives the same scores as a right-aligned window. Within the first T tokens
of a row the logits equal the full-window stepper's (test); later, an old position keeps the keys and values it
was computed with (from its own T-token context), where the full-window stepper recomputes it from a context
truncated at the window's start.

The math mirrors PathPredictor (flax defaults: LayerNorm ε = 1e-6, tanh-approximated GELU) on its parameter
tree; nothing is trained here.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.predict.path_predictor import NGRAMS, PredictorConfig, alibi_slopes, check_cache_shape, multi_hot

LN_EPS = 1e-6  # flax.linen.LayerNorm's default


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


def init_state(cfg: PredictorConfig, batch: int, context: int | None = None) -> dict:
    """Empty key/value rings of T = `context` (default the training window) positions: k, v f32[N, B, T, H, hd];
    pos i32[T] absolute position held by each slot (−1: none); t: positions seen (rows advance together)."""
    H, hd, T = cfg.num_heads, cfg.d_model // cfg.num_heads, context or cfg.window
    z = jnp.zeros((cfg.depth, batch, T, H, hd), jnp.float32)
    return {"k": z, "v": z, "pos": jnp.full((T,), -1, jnp.int32), "t": jnp.int32(0)}


@functools.partial(jax.jit, static_argnames=("cfg",))
def step(cfg: PredictorConfig, params: dict, state: dict, tokens: jax.Array, prev: jax.Array
         ) -> tuple[jax.Array, dict]:
    """One position per row. tokens i32[B] (or i32[B, 1 + G] with trigram hashes), prev i32[B, L, K] (the previous
    token's route, −1 = unknown) → (logits f32[B, L, E], the new state)."""
    L, E, H = cfg.num_layers, cfg.num_experts, cfg.num_heads
    T = state["pos"].shape[0]  # the ring's size: the context each prediction reads
    hd = cfg.d_model // H
    ids = tokens[..., 0] if tokens.ndim == 2 else tokens
    x = params["tok"]["embedding"][ids]                                                  # [B, D]
    if cfg.ngram_buckets:
        grams = tokens[..., 1:]                                                          # [B, G]
        g = params["ngram"]["embedding"][grams] * (grams > 0)[..., None]
        x = x + g.sum(-2) / np.sqrt(NGRAMS)
    if cfg.prev_route:
        x = x + multi_hot(prev, E) @ params["route"]
    t = state["t"]
    slot = t % T
    pos = state["pos"].at[slot].set(t)
    # the newest T positions, this one included (distance 0 … T−1); ALiBi: −slope_h · distance
    valid = (pos >= 0) & (pos > t - T)                                                   # [T]
    dist = (t - pos).astype(jnp.float32)
    bias = jnp.where(valid[None], -jnp.asarray(alibi_slopes(H), jnp.float32)[:, None] * dist[None], -1e9)  # [H, T]
    ks, vs = [], []
    for i in range(cfg.depth):
        p = params[f"block{i}"]
        qkv = jnp.einsum("bd,dchk->bchk", _layer_norm(p["LayerNorm_0"], x), p["DenseGeneral_0"]["kernel"]) \
            + p["DenseGeneral_0"]["bias"]                                                # [B, 3, H, hd]
        k = state["k"][i].at[:, slot].set(qkv[:, 1])                                     # [B, T, H, hd]
        v = state["v"][i].at[:, slot].set(qkv[:, 2])
        att = jnp.einsum("bhd,bthd->bht", qkv[:, 0], k) / np.sqrt(hd) + bias[None]      # [B, H, T]
        y = jnp.einsum("bht,bthd->bhd", jax.nn.softmax(att, axis=-1), v)
        x = x + jnp.einsum("bhd,hdo->bo", y, p["DenseGeneral_1"]["kernel"]) + p["DenseGeneral_1"]["bias"]
        h = _layer_norm(p["LayerNorm_1"], x) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        x = x + jax.nn.gelu(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        ks.append(k)
        vs.append(v)
    logits = _layer_norm(params["LayerNorm_0"], x) @ params["head"]["kernel"] + params["head"]["bias"]
    if cfg.token_rank:
        logits = logits + params["tok_table"]["embedding"][ids] @ params["tok_table_out"]["kernel"]
    new = {"k": jnp.stack(ks), "v": jnp.stack(vs), "pos": pos, "t": t + 1}
    return logits.reshape(-1, L, E), new


class IncrementalStepPredictor:
    """StepPredictor (ef_jax.predict.runtime) over a trained PathPredictor, one position per step per row.

    Args:
        tp: a TrainedPredictor (cfg, params, vocab).
        id_to_token: the model's token id → the vocabulary's string (as PathStepPredictor).
        context: positions each prediction reads (default the training window; ALiBi needs no change).
    A new batch size starts fresh histories, as in PathStepPredictor; so does `reset`.
    """

    def __init__(self, tp, id_to_token: Callable[[int], str] = str, context: int | None = None):
        if context is not None and context < 1:
            raise ValueError(f"context={context} must be ≥ 1")
        self.tp, self.id_to_token = tp, id_to_token
        self.context = context or tp.cfg.window
        self.params = jax.tree_util.tree_map(jnp.asarray, tp.params)
        self.reset(tp.cfg.num_layers, tp.cfg.num_experts)

    def reset(self, num_layers: int, num_experts: int) -> None:
        check_cache_shape(self.tp.cfg, num_layers, num_experts)
        self._state: dict | None = None
        self._current: list[list[int]] = [[] for _ in range(num_layers)]  # the step's observed route so far

    def predict(self, token_ids: np.ndarray) -> np.ndarray:
        cfg = self.tp.cfg
        ids = np.asarray(token_ids).reshape(-1)
        B, L, K = len(ids), cfg.num_layers, cfg.top_k
        prev = np.full((B, L, K), -1, np.int32)
        if self._state is None or self._state["k"].shape[1] != B:  # a new batch: fresh histories
            self._state = init_state(cfg, B, self.context)
        elif B == 1:  # the previous step's route (known exactly only for a single row; else the union)
            for l, exps in enumerate(self._current):
                prev[0, l, :min(K, len(exps))] = exps[:K]
        self._current = [[] for _ in range(L)]
        tokens = self.tp.vocab.encode([self.id_to_token(int(t)) for t in ids], cfg.ngram_buckets).astype(np.int32)
        logits, self._state = step(cfg, self.params, self._state, jnp.asarray(tokens), jnp.asarray(prev))
        return np.asarray(logits)

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self._current[layer].extend(int(e) for e in experts)
