"""Repetition penalty (CTRL, arXiv 1909.05858; transformers' RepetitionPenaltyLogitsProcessor): logits of tokens
already in the sequence (prompt included) are divided by `penalty` when positive and multiplied when negative.

Axes: B batch rows, V vocabulary. The seen-token mask lives on the host (it changes by one token per row per step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits f32[B, V], seen bool[B, V], penalty f32[] (> 1 discourages repeats) → f32[B, V]."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


class SeenTokens:
    """bool[B, V] host mask of the ids each row holds so far (prompt tokens, then every sampled token)."""

    def __init__(self, prompt_tokens: np.ndarray, prompt_valid: np.ndarray, vocab_size: int):
        """prompt_tokens i32[B, P] (left-padded), prompt_valid bool[B, P]: the pads are not seen tokens."""
        self.mask = np.zeros((prompt_tokens.shape[0], vocab_size), bool)
        for b in range(prompt_tokens.shape[0]):
            self.mask[b, prompt_tokens[b][prompt_valid[b]]] = True

    def add(self, row: int, token: int) -> None:
        self.mask[row, token] = True
