"""Causal self-attention with an explicit KV cache: grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE) and
multi-head latent attention (DeepSeek-V2).

[x] → q/k/v projections (+bias, q/k norm, clip) → RoPE → write k/v into the cache at `ctx.write_idx`
    → masked softmax over every cache slot → o projection

Axes: B batch, T new tokens, S cache slots, H query heads, Hkv kv heads, G = H/Hkv, Dh head dim,
r kv_lora_rank (MLA latent), dr qk_rope_head_dim, dn qk_nope_head_dim, Dv v_head_dim.

The cache holds S slots per row; a row's prompt is left-padded so all rows write new tokens at the same slot.
`ctx.valid` marks real tokens; a query attends to valid slots at or before its own slot (and inside the sliding
window, if any). Positions for RoPE are per row (pads do not count), so a padded row computes exactly what the
same prompt computes alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ef_jax import pytree

from ef_jax.config import ModelConfig
from ef_jax.models.layers import apply_rope, rms_norm


@pytree.dataclass
class AttnContext:
    """Per-call inputs shared by every layer of a step."""
    cos: jax.Array        # f32[B, T, dr/2 or Dh/2]
    sin: jax.Array        # f32[B, T, ...]
    write_idx: jax.Array  # i32[] first cache slot written by this call (slots write_idx .. write_idx+T-1)
    valid: jax.Array      # bool[B, S] slot holds a real token (new tokens included)


def init_layer_cache(cfg: ModelConfig, batch: int, slots: int, dtype) -> dict[str, jax.Array]:
    """Zeroed cache of one layer. GQA: k/v [B, S, Hkv, Dh]; MLA: the compressed latent ckv [B, S, r] and the
    shared rotary key kpe [B, S, dr] (what DeepSeek-V2 needs: ~(r+dr)/(2·H·Dh) of a full cache)."""
    if cfg.attention == "mla":
        return {"ckv": jnp.zeros((batch, slots, cfg.kv_lora_rank), dtype),
                "kpe": jnp.zeros((batch, slots, cfg.qk_rope_head_dim), dtype)}
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _mask(ctx: AttnContext, num_new: int, window: int | None) -> jax.Array:
    """bool[B, T, S]: may query t (at slot write_idx+t) read slot s."""
    slots = ctx.valid.shape[1]
    q_slot = ctx.write_idx + jnp.arange(num_new)[:, None]          # [T, 1]
    k_slot = jnp.arange(slots)[None, :]                            # [1, S]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed &= (q_slot - k_slot) < window
    allowed = allowed[None] & ctx.valid[:, None, :]
    # A padding query sees no valid slot; letting it see itself keeps its softmax finite (its output is unused).
    return allowed | (k_slot == q_slot)[None]


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B, T, Hkv, G, Dq], k [B, S, Hkv, Dq], v [B, S, Hkv, Dv], mask [B, T, S] → [B, T, Hkv·G·Dv]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def _write(buf: jax.Array, new: jax.Array, idx: jax.Array) -> jax.Array:
    start = (0, idx) + (0,) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)


def gqa_attention(p: dict, cfg: ModelConfig, x: jax.Array, cache: dict, ctx: AttnContext,
                  window: int | None = None):
    """Grouped-query attention. x [B, T, D] → ([B, T, D], updated cache). `window`: sliding window or None."""
    B, T, _ = x.shape
    H, Hkv, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm == "full":  # OLMoE normalises the whole projection, before splitting heads
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, Hkv, Dh), v.reshape(B, T, Hkv, Dh)
    if cfg.qk_norm == "head":  # Qwen3-MoE normalises each head
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, ctx.cos, ctx.sin, cfg.rope.interleaved)
    k = apply_rope(k, ctx.cos, ctx.sin, cfg.rope.interleaved)
    cache = {"k": _write(cache["k"], k, ctx.write_idx), "v": _write(cache["v"], v, ctx.write_idx)}
    q = q.reshape(B, T, Hkv, H // Hkv, Dh)  # head h reads kv head h // G, as repeat_kv does
    out = _attend(q, cache["k"], cache["v"], _mask(ctx, T, window), cfg.attn_scale)
    out = out @ p["o"]
    if cfg.o_bias:
        out = out + p["o_bias"]
    return out, cache


def mla_attention(p: dict, cfg: ModelConfig, x: jax.Array, cache: dict, ctx: AttnContext,
                  window: int | None = None):
    """DeepSeek-V2 multi-head latent attention. x [B, T, D] → ([B, T, D], updated cache)."""
    B, T, _ = x.shape
    H, dn, dr, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    eps = cfg.rms_norm_eps
    if cfg.q_lora_rank is None:
        q = x @ p["q"]
    else:
        qa = x @ p["q_a"]
        if cfg.qkv_bias:
            qa = qa + p["q_a_bias"]
        q = rms_norm(qa, p["q_a_norm"], eps) @ p["q_b"]
    q = q.reshape(B, T, H, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    kv_a = x @ p["kv_a"]
    if cfg.qkv_bias:
        kv_a = kv_a + p["kv_a_bias"]
    ckv = rms_norm(kv_a[..., :r], p["kv_a_norm"], eps)           # [B, T, r]
    k_pe = kv_a[..., r:].reshape(B, T, 1, dr)
    q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, interleaved=True)
    k_pe = apply_rope(k_pe, ctx.cos, ctx.sin, interleaved=True)[:, :, 0]
    cache = {"ckv": _write(cache["ckv"], ckv, ctx.write_idx), "kpe": _write(cache["kpe"], k_pe, ctx.write_idx)}
    S = cache["ckv"].shape[1]
    kv = (cache["ckv"] @ p["kv_b"]).reshape(B, S, H, dn + cfg.v_head_dim)  # expand the latent for every slot
    k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(cache["kpe"][:, :, None], (B, S, H, dr))], axis=-1)
    v = kv[..., dn:]
    qf = jnp.concatenate([q_nope, q_pe], axis=-1)[:, :, :, None]   # [B, T, H, 1, dn+dr]: each head its own kv
    out = _attend(qf, k, v, _mask(ctx, T, window), cfg.attn_scale)
    out = out @ p["o"]
    if cfg.o_bias:
        out = out + p["o_bias"]
    return out, cache
