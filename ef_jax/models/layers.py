"""Shared building blocks: RMSNorm, rotary embeddings, SwiGLU MLP.

Axes: B batch, T tokens (query positions), D model, Dh head dim, F ffn width.
All functions are pure; weights are stored [in, out] so a projection is `x @ w`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.config import RopeConfig


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * xf.astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(x·gate) ⊙ (x·up)); x [..., D], gate/up [D, F], down [F, D]."""
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


# --- rotary embeddings -----------------------------------------------------------------------------------------


def rope_frequencies(rope: RopeConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies f32[dim/2] and the cos/sin scale ("attention factor"), as transformers computes them."""
    dim, base = rope.dim, rope.theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (base ** exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return (inv_freq / rope.factor).astype(np.float32), 1.0
    assert rope.rope_type == "yarn", rope.rope_type
    return _yarn_frequencies(rope)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_frequencies(rope: RopeConfig) -> tuple[np.ndarray, float]:
    # YaRN: blend interpolated (÷factor) and original frequencies with a linear ramp over the dims whose
    # wavelength falls between beta_fast and beta_slow rotations of the original context.
    dim, base, factor = rope.dim, rope.theta, rope.factor
    if rope.attention_factor is not None:
        attn_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attn_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 → keep the original frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attn_factor)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32[B, T, dim/2] for integer positions i32[B, T]."""
    inv_freq, scale = rope_frequencies(rope)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotates x [B, T, H, dim] by cos/sin [B, T, dim/2].

    interleaved=False rotates (first half, second half) pairs (Llama/Mixtral/Qwen `rotate_half`);
    interleaved=True rotates adjacent (even, odd) pairs (DeepSeek-V2's complex-number view).
    Computed in float32 and cast back, as transformers does.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(xf.shape)
    else:
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(dtype)
