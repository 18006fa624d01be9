"""The device-resident step on an expert mesh (`OffloadConfig(step="device")` with `devices=`): one jitted
`shard_map`ped program per token step, every device running its own expert cache over its own experts.

x (replicated) → [pregate / expertflow: predictions from the embeddings] → every device, per layer: attention
    (+ KV cache) and router, the same on every device
    → MoE layer j: the routing seen by device d = the (token, expert) pairs it owns, as local ids (others: weight 0,
      id E_max, which needs nothing) → device_step.moe_layer on d's DeviceCache, slot pool and pinned-host stack:
      needed → hits / misses / victims by d's policy → copy d's misses into d's slots → d's experts' f32 partial
      sum (more passes when d's share exceeds its S slots, each device as many as it needs)
    → psum over the mesh (the one collective per MoE layer) → + the shared expert (replicated) → h + y
    → [pregate / expertflow: score later layers from h, keep this device's columns, prefetch into its slots]
→ (x, caches, routings, routed i32[L, N, K], pool, cache state, counters i32[n, C, L] gathered on every device
   [, plan.record: what each device's policy acted on — its scores, ratio and slot table — for its host twin])

Device d owns the contiguous block `starts[d] .. starts[d] + sizes[d]` of every MoE layer's experts
(ef_jax.cache.partition, as the layer-mode mesh splits them). Its host stack and its cache hold E_max rows /
columns starting at `bases[d]` (= starts[d], or earlier for the last devices of an uneven split, so every device's
stack has the same shape); only the experts it owns are ever wanted there.

Nothing crosses devices but the psum of each MoE layer's output and the counters gathered at the end: each cache's
decisions depend on its own experts' routing only, so lru, lfu and nocache make on device d exactly the decisions a
one-device cache of d's experts would make. The scoring policies (pregate, expertflow) score every later router on
the replicated hidden state, take each real row's top-k over all E experts, and keep device d's columns of it
(`local_columns`): each device prefetches the predicted experts it owns, gates on its own precision counters, and
(expertflow) adapts its own horizon from its own late and unused counts. predictive is refused (its routing-path
table is one over every expert).

Axes: n devices, B rows, T new tokens, N = B·T, D model, E experts, E_max experts per device's cache, K top-k,
L MoE layers, S slots per device and MoE layer, C counters.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from ef_jax.engine.programs import device_cache as dc
from ef_jax.engine.programs import device_policies as dp
from ef_jax.engine.programs.device_step import StepPlan, _predict, moe_layer
from ef_jax.engine.programs.layer import layer_view, walk_layers
from ef_jax.models.moe import Routing, expert_ffn, shared_output
from ef_jax.models.transformer import make_context


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """The static split of every MoE layer's experts over the mesh (hashable: a jit static argument)."""
    mesh: Mesh
    axis: str
    starts: tuple[int, ...]   # first expert device d owns
    sizes: tuple[int, ...]    # E_d: experts device d owns
    bases: tuple[int, ...]    # global id of local id 0 on device d (its host stack's first row)
    experts: int              # E_max: rows of every device's stack, columns of its cache

    @classmethod
    def of(cls, mesh: Mesh, axis: str, partition) -> "MeshLayout":
        E, E_max = partition.num_experts, partition.max_size
        return cls(mesh=mesh, axis=axis, starts=tuple(partition.starts), sizes=tuple(partition.sizes),
                   bases=tuple(min(s, E - E_max) for s in partition.starts), experts=E_max)


def local_routing(layout: MeshLayout, routing: Routing) -> Routing:
    """The routing as this device sees it: the pairs it owns as local ids, the others as id E_max (no expert:
    `needed_experts` ignores it) with weight 0. Call inside the shard_map."""
    d = jax.lax.axis_index(layout.axis)
    start, size, base = (jnp.asarray(v, jnp.int32)[d] for v in (layout.starts, layout.sizes, layout.bases))
    e = routing.experts
    mine = (e >= start) & (e < start + size)                                  # bool[N, K]
    return Routing(logits=routing.logits, experts=jnp.where(mine, e - base, layout.experts),
                   weights=jnp.where(mine, routing.weights, 0.0))


def local_columns(layout: MeshLayout, a, fill):
    """This device's columns of a [..., E] array over every expert: its cache's E_max ids from its base, `fill`
    where it does not own the expert. Call inside the shard_map."""
    d = jax.lax.axis_index(layout.axis)
    start, size, base = (jnp.asarray(v, jnp.int32)[d] for v in (layout.starts, layout.sizes, layout.bases))
    cols = jax.lax.dynamic_slice_in_dim(a, base, layout.experts, axis=a.ndim - 1)
    ids = base + jnp.arange(layout.experts, dtype=jnp.int32)
    return jnp.where((ids >= start) & (ids < start + size), cols, jnp.asarray(fill, a.dtype))


def _local_share(cfg, plan: StepPlan, j: int, p: dict, normed, routing: Routing, keep, pool, state: dc.DeviceCache,
                 include_shared):
    """device_step._expert_share for one device of the mesh: its own pairs' f32 partial sum, no shared expert
    (added once, after the psum). An id E_max (a pair of another device) reads a clamped slot with weight 0."""
    view, smap = layer_view(pool, state.slot_of_expert, j, routing.experts.size, normed.dtype)
    slots = smap[jnp.minimum(routing.experts, smap.shape[0] - 1)]
    return expert_ffn(normed, slots, routing.weights * keep, view, out_dtype=jnp.float32, kernel=plan.kernel)


def mesh_moe(cfg, plan: StepPlan, layout: MeshLayout, j: int, p: dict, h, normed, routing: Routing, real, pool,
             state: dc.DeviceCache, stack):
    """Inside the shard_map: h [B, T, D] + MoE layer j's output, each device's experts made resident in its own
    slots first. Returns (x, pool, state) (x replicated, pool and state this device's)."""
    acc = jnp.zeros(h.shape, jnp.float32)
    acc, pool, state = moe_layer(cfg, plan, j, p, acc, normed, local_routing(layout, routing), real, pool, state,
                                 stack, share=_local_share)
    y = jax.lax.psum(acc, layout.axis).astype(normed.dtype).reshape(normed.shape)
    if cfg.shared_intermediate:
        y = y + shared_output(p, cfg, normed)
    return h + y.reshape(h.shape), pool, state


def _one(tree):
    return jax.tree.map(lambda a: a[0], tree)   # this device's block [1, ...] → [...]


def _all(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _specs(layout: MeshLayout):
    """(replicated, pool [L, n·S, ...], per-device leading axis [n, ...]) partition specs."""
    return P(), P(None, layout.axis), P(layout.axis)


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "plan", "layout"),
                   donate_argnames=("caches", "pool", "state"))
def mesh_step(cfg, kinds, plan: StepPlan, layout: MeshLayout, params: tuple, x, caches: tuple, positions, write_idx,
              valid, real, pool, state: dc.DeviceCache, stacks: tuple, scorer=None):
    """Every layer of one step on every device of the mesh. x [B, T, D] and caches replicated; pool: every
    device's stacked slot pool as one array [L, n·S, ...] (donated); state: every device's DeviceCache with a
    leading device axis [n, ...] (donated); stacks: per MoE layer pinned-host [n·E_max, W] split over the mesh;
    scorer: the pre-gate routers of a scoring policy (replicated; device_step.device_step's), or None.
    Returns (x, caches, routings per layer, routed i32[L, N, K], pool, state, counters i32[n, C, L]), and with
    plan.record one more: what each device's policy acted on (`_recorded`, every leaf with a leading axis n)."""
    rep, pooled, per = _specs(layout)

    def body(params, x, caches, positions, write_idx, valid, real, pool, state, stacks, scorer):
        ctx = make_context(cfg, positions, write_idx, valid)
        state = dc.begin_step(_one(state), plan.flush)
        ratio = state.policy.ratio                                       # f32[]: this device's, for the record
        L, local = len(stacks), functools.partial(local_columns, layout)
        rows_real = real.reshape(x.shape[0], -1)[:, -1]                  # bool[B]: the newest position is real
        scored = ()  # plan.record: f32[L, B, E] per scoring site, in step order
        if plan.policy.scoring:  # step start: the embeddings stand in for the hidden state of "layer −1"
            state, sc = _predict(cfg, plan, -1, x, rows_real, scorer, state, L, local=local)
            scored = scored + (sc,) if plan.record else scored

        def moe(j, p, h, normed, routing, carry):
            pool, state, scored = carry
            x, pool, state = mesh_moe(cfg, plan, layout, j, p["mlp"], h, normed, routing, real, pool, state,
                                      stacks[j])
            if plan.policy.scoring and j + 1 < L:  # this layer's hidden state scores the next layers' routers
                state, sc = _predict(cfg, plan, j, h, rows_real, scorer, state, L, local)
                scored = scored + (sc,) if plan.record else scored
            return x, routing, (pool, state, scored)

        x, new_caches, routings, routed, (pool, state, scored) = walk_layers(cfg, kinds, params, x, caches, ctx, moe,
                                                                             (pool, state, scored))
        state = state.replace(policy=dp.end_step(plan.policy, state.policy, L))
        counters = jax.lax.all_gather(state.counters(), layout.axis)    # i32[n, C, L] on every device
        out = (x, new_caches, routings, routed, pool, _all(state), counters)
        return out + (_all(_recorded(scored, ratio, state)),) if plan.record else out

    # check_vma=False: a pallas_call carries no varying-axes type (as ef_jax.models.expert_parallel)
    out_specs = (rep, rep, rep, rep, pooled, per, rep) + ((per,) if plan.record else ())
    run = jax.shard_map(body, mesh=layout.mesh, in_specs=(rep, rep, rep, rep, rep, rep, rep, pooled, per, per, rep),
                        out_specs=out_specs, check_vma=False)
    return run(params, x, caches, positions, write_idx, valid, real, pool, state, stacks, scorer)


def _recorded(scored: tuple, ratio, state: dc.DeviceCache) -> dict:
    """What this device's policy acted on in the step, for its host twin (ef_jax.sim.device_twin with this
    device's `columns`): scores f32[L, L, B, E] per scoring site, over every expert (each device takes the top-k
    over all E, then keeps its own columns; None: a policy that scores nothing), the copy/layer ratio f32[] in
    force, and its slot table i32[L, S] after the step (the evictions, checked step by step)."""
    return {"scores": jnp.stack(scored) if scored else None, "ratio": ratio,
            "expert_of_slot": state.expert_of_slot}


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "layout", "j", "first"),
                   donate_argnames=("pool", "state"))
def mesh_layer(cfg, plan: StepPlan, layout: MeshLayout, j: int, first: bool, p: dict, h, normed, routing: Routing,
               real, pool, state: dc.DeviceCache, stack):
    """MoE layer j alone on the mesh, for a step whose hidden states are tapped between layers (device_step's
    device_layer, per device). Returns (x, pool, state, counters i32[n, C, L])."""
    rep, pooled, per = _specs(layout)

    def body(p, h, normed, routing, real, pool, state, stack):
        state = _one(state)
        if first:
            state = dc.begin_step(state, plan.flush)
        x, pool, state = mesh_moe(cfg, plan, layout, j, p, h, normed, routing, real, pool, state, stack)
        return x, pool, _all(state), jax.lax.all_gather(state.counters(), layout.axis)

    run = jax.shard_map(body, mesh=layout.mesh, in_specs=(rep, rep, rep, rep, rep, pooled, per, per),
                        out_specs=(rep, pooled, per, rep), check_vma=False)
    return run(p, h, normed, routing, real, pool, state, stack)
