"""The compiled programs of a step that the host runs between sync points (dense groups use models.run_group).

attend_route(layer i): [the dense layers before it] → attention (+ KV cache, donated) → router [→ the pre-gate
  scores of every MoE layer, for a policy that predicts from this hidden state (pregate_scores)]
expert_pass(layer i): h + this pass's share of the MoE output, experts read through a slot pool and slot map
offloaded_expert_pass(layer i): the same over the stacked offload pool, with the layer's copies and slot-table
  updates inside the program (so copies overlap its compute, and no separate dispatch moves bytes or maps)
offloaded_expert_pass_then_attend(layer i): offloaded_expert_pass, then attend_route of the next MoE layer on its
  output (the dense layers between them included): one dispatch per MoE layer
walk_layers: every layer of a one-program step (device_step, mesh_step): attention and router, then the dense
  MLP or the caller's MoE layer (its own cache, pool and counters threaded through a carry)

Axes: B rows, T new tokens, N = B·T tokens, D model, K top-k, E experts, S slots.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ef_jax.engine.transfer.store import put_experts
from ef_jax.models.moe import ExpertPool, Routing, moe_combine, slices_layer
from ef_jax.models.transformer import layer_attention_and_route, layer_finish, make_context


class Attended(NamedTuple):
    """What a MoE layer's attend_route returns (and what an expert program that chains attention hands back for
    the next MoE layer)."""
    h: jax.Array          # [B, T, D] the MoE layer's input (the residual after its attention)
    normed: jax.Array     # [N, D] its FFN-normed input
    routing: Routing
    dense_caches: tuple   # the KV caches of the dense layers run before it (new, the old ones donated)
    cache: dict           # the MoE layer's KV cache (new)
    scores: jax.Array | None  # f32[L, B, E] pre-gate scores of h when a scorer was given (pregate_scores), else None


class AttentionInputs(NamedTuple):
    """The traced, not donated arguments of the next MoE layer's attend_route (its static kinds and its donated
    KV caches travel beside it), for an expert program that runs that layer's attention and router at its end."""
    dense_params: tuple   # the dense layers before it
    params: dict          # the MoE layer's own
    positions: jax.Array  # i32[B, T]
    write_idx: jax.Array  # i32[]
    valid: jax.Array      # bool[B, S]
    scorer: tuple | None  # a policy's pre-gate routers on the device (see pregate_scores), or None


class NextAttention(NamedTuple):
    """The next MoE layer's attend_route, handed to the expert program of the layer before it."""
    dense_kinds: tuple    # static: the kinds of the dense layers before it
    kind: object          # static: its LayerKind
    inputs: AttentionInputs
    dense_caches: tuple   # donated
    cache: dict           # donated


def pregate_scores(scorer, h, layers: range | None = None):
    """The MoE layers' routers on h's newest position, as ef_jax.policies.pregate.PregateScorer.scores computes
    them on the host: scorer (norms f32[L, D], routers f32[L, D, E], eps f32[]), h [B, T, D] → f32[L', B, E].
    layers: the rows scored (static; None: all L) — a step's prediction site reaches only H_max later layers,
    so it scores those routers, not all L."""
    norms, routers, eps = scorer
    if layers is not None:
        norms, routers = norms[layers.start:layers.stop], routers[layers.start:layers.stop]
    x = newest_normed(h, eps)                                            # [B, D]
    return jnp.einsum("lbd,lde->lbe", x[None] * norms[:, None], routers, precision=jax.lax.Precision.HIGHEST)


def newest_normed(h, eps):
    """h [B, T, D] → f32[B, D]: the newest position, RMS-normalised without a scale (the host's hybrid.model.rms)."""
    x = h[:, -1].astype(jnp.float32)
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def walk_layers(cfg, kinds, params: tuple, x, caches: tuple, ctx, moe, carry):
    """Every layer of a one-program step, in order. x [B, T, D]; caches: per layer KV cache; ctx: the step's
    attention context (make_context). For MoE layer j (0, 1, … over the MoE layers only; a Python int, so each
    layer's code is specialised) calls moe(j, p, h, normed, routing, carry) → (x, routing, carry): the layer's
    output, the routing it acted on (cache-aware routing may replace the router's), and the caller's carry (its
    pool, cache state, …). Dense layers finish here.
    Returns (x, new caches, routings per layer (None for dense ones), routed i32[L, N, K], carry)."""
    new_caches, routings, routed, j = [], [], [], 0
    for p, kind, cache in zip(params, kinds, caches):
        h, normed, routing, cache = layer_attention_and_route(p, cfg, kind, x, cache, ctx)
        new_caches.append(cache)
        if kind.moe:
            x, routing, carry = moe(j, p, h, normed, routing, carry)
            routed.append(routing.experts)
            j += 1
        else:
            x = layer_finish(p, cfg, kind, h, normed, None, None, None)
        routings.append(routing)
    return x, tuple(new_caches), tuple(routings), jnp.stack(routed), carry


def _attend_route(cfg, dense_kinds, kind, dense_params, p, x, dense_caches, cache, positions, write_idx, valid,
                  scorer):
    ctx = make_context(cfg, positions, write_idx, valid)
    new = []
    for dp, dk, dc in zip(dense_params, dense_kinds, dense_caches):
        hd, nd, _, dc = layer_attention_and_route(dp, cfg, dk, x, dc, ctx)
        x = layer_finish(dp, cfg, dk, hd, nd, None, None, None)
        new.append(dc)
    h, normed, routing, cache = layer_attention_and_route(p, cfg, kind, x, cache, ctx)
    scores = None if scorer is None else pregate_scores(scorer, h)
    return Attended(h, normed, routing, tuple(new), cache, scores)


@functools.partial(jax.jit, static_argnames=("cfg", "dense_kinds", "kind"),
                   donate_argnames=("dense_caches", "cache"))
def attend_route(cfg, dense_kinds, kind, dense_params, p, x, dense_caches, cache, positions, write_idx, valid,
                 scorer=None):
    """The dense layers before a MoE layer (whole), then its attention and router, in one program (dense work
    joins the next routing program instead of costing a dispatch of its own). x [B, T, D] →
    Attended (see there)."""
    return _attend_route(cfg, dense_kinds, kind, dense_params, p, x, dense_caches, cache, positions, write_idx, valid,
                         scorer)


@functools.partial(jax.jit, static_argnames=("cfg", "include_shared", "kernel"))
def expert_pass(cfg, include_shared, p, h, normed, routing: Routing, keep, pool: ExpertPool, slot_map, *,
                kernel: str):
    """h [B, T, D] + this pass's share of the MoE output. keep f32[N, K]: 1 where (token, expert) is computed
    in this pass (real token, expert resident in this pass), else 0 (that pair contributes exactly zero).
    slot_map i32[E]: slot of each expert, -1 = not resident (clamped: such pairs have keep = 0).
    kernel: the expert FFN (ef_jax.models.moe.EXPERT_KERNELS; the model's expert_kernel)."""
    masked = Routing(logits=routing.logits, experts=routing.experts, weights=routing.weights * keep)
    y = moe_combine(p, cfg, normed, masked, pool, jnp.maximum(slot_map, 0), include_shared, kernel=kernel)
    return h + y.reshape(h.shape)


def _apply_table_updates(slot_of_expert, updates, reset):
    """slot_of_expert i32[L, E] after `reset` (all -1) and then each update row (layer, expert, slot, evicted),
    in order (an expert evicted and reloaded by the same batch ends up where its last row puts it)."""
    soe = jnp.where(reset, jnp.full_like(slot_of_expert, -1), slot_of_expert)
    if updates.shape[0] == 0:
        return soe

    def body(i, soe):
        layer, expert, slot, evicted = updates[i, 0], updates[i, 1], updates[i, 2], updates[i, 3]
        ev = jnp.maximum(evicted, 0)
        soe = soe.at[layer, ev].set(jnp.where(evicted >= 0, -1, soe[layer, ev]))
        return soe.at[layer, expert].set(slot)

    return jax.lax.fori_loop(0, updates.shape[0], body, soe)


def layer_view(pool, slot_of_expert, j, pairs: int, dtype):
    """MoE layer j of the stacked pool [L, S, ...] as (pool view, slot map i32[E]) for moe_combine. pairs: the
    (token, expert) pairs routed (static); dtype: of the compute (static). Decode, and a pool converted in blocks
    (ef_jax.models.expert_blocks), read straight from the pool seen as [L·S, ...] (no copy of layer j's slots: the
    map points into layer j's block); an unblocked prefill runs grouped matmuls over layer j's S slots."""
    L, S = pool.gate.shape[:2]
    smap = jnp.maximum(jax.lax.dynamic_index_in_dim(slot_of_expert, j, keepdims=False), 0)  # i32[E]
    if not slices_layer(pool, S, pairs, dtype):
        return jax.tree.map(lambda a: a.reshape((L * S,) + a.shape[2:]), pool), smap + j * S
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False), pool), smap


def _offloaded_expert_pass(cfg, include_shared, p, h, normed, routing, keep, pool, slot_of_expert, j, bufs, moves,
                           reset, kernel):
    n = len(bufs)  # moves' first n rows place the buffers, the rest update the table (one host→device transfer)
    if n:  # row moves[i, 2] of host array bufs[i] [n_i, W]: a slice, then a move (an async copy); then written
        rows = [jax.device_put(jax.lax.dynamic_slice(b, (moves[i, 2], 0), (1, b.shape[1])), jax.memory.Space.Device)
                for i, b in enumerate(bufs)]
        pool = put_experts(pool, rows, moves[:n, 0], moves[:n, 1])
    soe = _apply_table_updates(slot_of_expert, moves[n:], reset)
    view, smap = layer_view(pool, soe, j, routing.experts.size, normed.dtype)
    masked = Routing(logits=routing.logits, experts=routing.experts, weights=routing.weights * keep)
    y = moe_combine(p, cfg, normed, masked, view, smap, include_shared, kernel=kernel)
    return h + y.reshape(h.shape), pool, soe


@functools.partial(jax.jit, static_argnames=("cfg", "include_shared", "kernel"),
                   donate_argnames=("pool", "slot_of_expert"))
def offloaded_expert_pass(cfg, include_shared, p, h, normed, routing: Routing, keep, pool: ExpertPool,
                          slot_of_expert, j, bufs, moves, reset, *, kernel: str):
    """One MoE layer's expert program in the offloaded engine, with its copies inside it.

    h [B, T, D], normed [N, D], routing of layer j; keep f32[N, K] (0 for padding and for experts left to another
    pass); pool: the stacked slot pool ExpertPool [L, S, ...] (donated, written in place); slot_of_expert
    i32[L, E] (donated): the device copy of the slot table, -1 = not resident; j: this MoE layer (traced: one
    program for every layer); bufs: host arrays [n_i, W] (a MoE layer's pinned stack of expert rows, see
    ef_jax.engine.transfer.store) whose row moves[i, 2] is moved to the device here, so XLA overlaps the copies
    with this program's compute; moves i32[n + m, 4]: rows 0..n−1 (layer, slot, row, ·) of each
    buffer (any layer: a prefetch for a later layer travels in this program), then m rows (layer, expert, slot,
    evicted) of slot-table changes since the last program; reset: bool, clear the table first (a flushing policy);
    kernel: the expert FFN (ef_jax.models.moe.EXPERT_KERNELS, static).
    Returns (h + this pass's MoE output, pool, slot_of_expert)."""
    return _offloaded_expert_pass(cfg, include_shared, p, h, normed, routing, keep, pool, slot_of_expert, j, bufs,
                                  moves, reset, kernel)


@functools.partial(jax.jit, static_argnames=("cfg", "include_shared", "dense_kinds", "kind", "kernel"),
                   donate_argnames=("pool", "slot_of_expert", "dense_caches", "cache"))
def offloaded_expert_pass_then_attend(cfg, include_shared, p, h, normed, routing: Routing, keep, pool: ExpertPool,
                                      slot_of_expert, j, bufs, moves, reset, dense_kinds, kind, then: AttentionInputs,
                                      dense_caches, cache, *, kernel: str):
    """offloaded_expert_pass of MoE layer j, then attend_route of the next MoE layer (`then`; the KV caches of it
    and of the dense layers before it donated) on its output, in one program: one dispatch per MoE layer instead
    of two. Returns (x: layer j's output [B, T, D], pool, slot_of_expert, the next layer's Attended)."""
    x, pool, soe = _offloaded_expert_pass(cfg, include_shared, p, h, normed, routing, keep, pool, slot_of_expert, j,
                                          bufs, moves, reset, kernel)
    nxt = _attend_route(cfg, dense_kinds, kind, then.dense_params, then.params, x, dense_caches, cache,
                        then.positions, then.write_idx, then.valid, then.scorer)
    return x, pool, soe, nxt
