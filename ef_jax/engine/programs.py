"""The compiled programs of a step that the host runs between sync points (dense groups use models.run_group).

attend_route(layer i): attention (+ KV cache, donated) → router → (h, normed, routing, cache)
expert_pass(layer i): h + this pass's share of the MoE output, experts read through a slot pool and slot map

Axes: B rows, T new tokens, N = B·T tokens, D model, K top-k, E experts, S slots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ef_jax.models.moe import ExpertPool, Routing, moe_combine
from ef_jax.models.transformer import layer_attention_and_route, make_context


@functools.partial(jax.jit, static_argnames=("cfg", "kind"), donate_argnames=("cache",))
def attend_route(cfg, kind, p, x, cache, positions, write_idx, valid):
    """x [B, T, D] → (h [B, T, D], normed FFN input [N, D], Routing, cache)."""
    ctx = make_context(cfg, positions, write_idx, valid)
    return layer_attention_and_route(p, cfg, kind, x, cache, ctx)


@functools.partial(jax.jit, static_argnames=("cfg", "include_shared"))
def expert_pass(cfg, include_shared, p, h, normed, routing: Routing, keep, pool: ExpertPool, slot_map):
    """h [B, T, D] + this pass's share of the MoE output. keep f32[N, K]: 1 where (token, expert) is computed
    in this pass (real token, expert resident in this pass), else 0 (that pair contributes exactly zero).
    slot_map i32[E]: slot of each expert, -1 = not resident (clamped: such pairs have keep = 0)."""
    masked = Routing(logits=routing.logits, experts=routing.experts, weights=routing.weights * keep)
    y = moe_combine(p, cfg, normed, masked, pool, jnp.maximum(slot_map, 0), include_shared)
    return h + y.reshape(h.shape)
