"""The decoder: embedding, layers (attention + dense MLP or MoE), final norm and LM head, run in layer groups.

[tokens] → embed → group 0 (layers 0..g-1) → group 1 → … → final norm → lm head → [logits]

Each group is one jitted call, so a host loop can run between groups (the offload engine does its routing sync
and expert transfers there). A layer is also callable in two halves, `layer_attention_and_route` and
`layer_finish`, for an engine that must read a layer's routing before its experts run.

Param pytree (weights [in, out]):
  embed [V, D]; final_norm [D]; lm_head [D, V] (absent when tied to embed)
  layers[i]: attn_norm [D], attn {...}, mlp_norm [D], mlp: dense {gate, up, down} | moe {router [D, E],
             shared? {gate, up, down}, shared_gate? [D, 1]}
Routed experts are not params: they arrive as an ExpertPool per MoE layer plus slot_of_expert.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ef_jax import pytree

from ef_jax.config import ModelConfig
from ef_jax.models import attention as attn_lib
from ef_jax.models.layers import rms_norm, rope_cos_sin, swiglu
from ef_jax.models.moe import ExpertPool, Routing, moe_combine, route


class LayerKind(NamedTuple):
    """What a layer computes, as a static (hashable) key: groups of equal kinds share one compiled program."""
    moe: bool
    window: int | None


def layer_kinds(cfg: ModelConfig) -> tuple[LayerKind, ...]:
    return tuple(LayerKind(cfg.moe_layers[i], cfg.sliding_windows[i]) for i in range(cfg.num_layers))


@pytree.dataclass
class KVCache:
    """Explicit decode state: one cache dict per layer plus which slots hold real tokens."""
    layers: tuple      # per layer: {"k","v"} [B, S, Hkv, Dh] or {"ckv" [B, S, r], "kpe" [B, S, dr]}
    valid: jax.Array   # bool[B, S]


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "slots", "dtype"))
def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype) -> KVCache:
    """The zeroed cache of every layer, as ONE program (op by op it is a zeros program per shape and dtype, each
    a compile, or a compilation-cache load, on a CLI run's way to its first token)."""
    layers = tuple(attn_lib.init_layer_cache(cfg, batch, slots, dtype) for _ in range(cfg.num_layers))
    return KVCache(layers=layers, valid=jnp.zeros((batch, slots), bool))


def layer_attention_and_route(p: dict, cfg: ModelConfig, kind: LayerKind, x: jax.Array, cache: dict,
                              ctx: attn_lib.AttnContext):
    """First half of a layer. x [B, T, D] → (h residual stream [B, T, D], normed FFN input [N, D],
    routing or None, cache)."""
    B, T, D = x.shape
    fn = attn_lib.mla_attention if cfg.attention == "mla" else attn_lib.gqa_attention
    # The window comes from the static kind (not the layer index), so layers of equal kind share one trace.
    a, cache = fn(p["attn"], cfg, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), cache, ctx, kind.window)
    h = x + a
    normed = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps).reshape(B * T, D)
    routing = route(p["mlp"], cfg, normed) if kind.moe else None
    return h, normed, routing, cache


def layer_finish(p: dict, cfg: ModelConfig, kind: LayerKind, h: jax.Array, normed: jax.Array,
                 routing: Routing | None, pool: ExpertPool | None, slot_of_expert: jax.Array | None,
                 kernel: str | None = None) -> jax.Array:
    """Second half of a layer: the dense MLP or the MoE block, added to the residual stream h [B, T, D].
    kernel: the MoE block's expert FFN (ef_jax.models.moe.EXPERT_KERNELS; a dense layer has none, and a MoE layer
    without one is refused by moe.expert_ffn: no silent default)."""
    if kind.moe:
        y = moe_combine(p["mlp"], cfg, normed, routing, pool, slot_of_expert, kernel=kernel)
    else:
        m = p["mlp"]
        y = swiglu(normed, m["gate"], m["up"], m["down"])
    return h + y.reshape(h.shape)


def make_context(cfg: ModelConfig, positions: jax.Array, write_idx: jax.Array, valid: jax.Array):
    cos, sin = rope_cos_sin(positions, cfg.rope)
    return attn_lib.AttnContext(cos=cos, sin=sin, write_idx=write_idx, valid=valid)


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "kernel"), donate_argnames=("caches",))
def run_group(cfg: ModelConfig, kinds: tuple[LayerKind, ...], params: tuple, pools: tuple, slot_maps: tuple,
              x: jax.Array, caches: tuple, positions: jax.Array, write_idx: jax.Array, valid: jax.Array, *,
              kernel: str):
    """Runs consecutive layers with all their experts available in `pools` (resident, or made resident by the
    caller beforehand). x [B, T, D]; positions i32[B, T]; valid bool[B, S]; kernel: the expert FFN
    (ef_jax.models.moe.EXPERT_KERNELS).
    Returns (x, caches, routings: tuple of Routing (MoE layers) / None)."""
    ctx = make_context(cfg, positions, write_idx, valid)
    new_caches, routings = [], []
    for p, kind, pool, smap, cache in zip(params, kinds, pools, slot_maps, caches):
        h, normed, routing, cache = layer_attention_and_route(p, cfg, kind, x, cache, ctx)
        x = layer_finish(p, cfg, kind, h, normed, routing, pool, smap, kernel)
        new_caches.append(cache)
        routings.append(routing)
    return x, tuple(new_caches), tuple(routings)


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(cfg: ModelConfig, table: jax.Array, tokens: jax.Array) -> jax.Array:
    """tokens i32[B, T] → [B, T, D]."""
    return table[tokens]


@functools.partial(jax.jit, static_argnames=("cfg", "last_only"))
def head(cfg: ModelConfig, params: dict, x: jax.Array, last_only: bool) -> jax.Array:
    """Final norm + LM head. x [B, T, D] → f32 logits [B, T, V] ([B, V] for the last position if last_only)."""
    if last_only:
        x = x[:, -1]
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return (x @ w).astype(jnp.float32)
