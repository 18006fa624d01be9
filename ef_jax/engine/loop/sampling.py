"""Next-token choice from logits: greedy, or temperature → top-k → top-p (nucleus) sampling with a PRNG key.

Axes: B batch rows, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Frozen and hashable: passed to jit as a static argument."""
    temperature: float = 0.0   # 0 → greedy (argmax)
    top_k: int | None = None   # keep the k most likely tokens
    top_p: float = 1.0         # keep the smallest set whose probability reaches top_p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be None or a positive int")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.jit
def step_key(key: jax.Array, step) -> jax.Array:
    """fold_in(key, step) as one compiled program: op by op it costs several dispatches on every decode step."""
    return jax.random.fold_in(key, step)


@functools.partial(jax.jit, static_argnames=("params",))
def sample(logits: jax.Array, key: jax.Array | None, params: SamplingParams) -> jax.Array:
    """logits f32[B, V] → token ids i32[B]. Each row draws from its own fold of `key` (None when greedy: argmax
    draws nothing)."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / params.temperature
    neg = jnp.finfo(jnp.float32).min
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if params.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= params.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    keys = jax.random.split(key, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
