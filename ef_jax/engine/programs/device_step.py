"""The device-resident step (`OffloadConfig(step="device")`): one jitted program per token step, all layers.

x → [apply every MoE layer's prefetch hints] → per layer: attention (+ KV cache) → router
    → MoE layer: needed = ∪ real tokens' experts → misses, LRU victims (never a slot this pass needs) → copy the
      misses (and the prefetches decided for this layer earlier in the step: device_cache.demand) from the
      layer's pinned-host stack into the slot pool → expert FFN through the slot map
    → (union > S slots: further passes of ≤ S experts, each adding its share, inside the same program)
    → [a scoring policy: the later layers' scores from this layer's hidden state — pre-gating, or with expertflow's
      hybrid head (device_hybrid) the head's logits at its point — → predictions and prefetches (tables now,
      bytes with the target layer's demand copies)]
→ (x, caches, routings, routed i32[L, N, K], hidden [L, B, D] when asked, pool, cache state, counters)

Nothing in the step returns to the host: the pool, the cache state (ef_jax.engine.programs.device_cache.DeviceCache) and the
KV cache are donated and threaded to the next step; routed experts, hidden states and counters are small outputs
the host reads after the sampled token (which waits for the step anyway), so a decoded token costs one sync.

Axes: B rows, T new tokens, N = B·T, D model, E experts, K top-k, L MoE layers, S slots, H hints per layer.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ef_jax.engine.programs import device_cache as dc
from ef_jax.engine.programs import device_hybrid as dh
from ef_jax.engine.programs import device_policies as dp
from ef_jax.engine.programs.device_routing import cache_aware
from ef_jax.engine.programs.layer import pregate_scores
from ef_jax.engine.programs.layer import layer_view, walk_layers
from ef_jax.models.moe import Routing, moe_combine
from ef_jax.models.transformer import make_context


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The static sizes of one compiled step (hashable: a jit static argument)."""
    slots: int                # S
    max_misses: int           # M: misses of one pass, min(S, N·K, E)
    max_passes: int           # passes a layer may need: ceil(min(E, N·K) / S)
    hint_width: int           # H: hints per layer (0: the policy sends none)
    flush: bool               # empty every slot at step start (the nocache baseline)
    hidden_point: str | None  # "attention" | "moe": the hidden state returned (recording a hybrid head's sites)
    policy: dp.DevicePolicy = dp.DevicePolicy()  # the device policy (ef_jax.engine.programs.device_policies)
    record: bool = False      # return the pre-gate scores the policy acted on (for the host twin)
    tolerance: float | None = None  # cache-aware routing's δ (ef_jax.engine.programs.device_routing); None: exact
    kernel: str = "xla"       # the expert FFN (ef_jax.models.moe.EXPERT_KERNELS): the model's expert_kernel

    @classmethod
    def for_tokens(cls, n: int, num_experts: int, top_k: int, slots: int, hint_width: int, flush: bool,
                   hidden_point: str | None, policy: dp.DevicePolicy | None = None,
                   record: bool = False, tolerance: float | None = None, *, kernel: str) -> "StepPlan":
        pairs = min(num_experts, n * top_k)
        return cls(slots=slots, max_misses=min(slots, pairs), max_passes=-(-pairs // slots), hint_width=hint_width,
                   flush=flush, hidden_point=hidden_point, policy=policy or dp.DevicePolicy(), record=record,
                   tolerance=tolerance, kernel=kernel)


def _expert_share(cfg, plan: StepPlan, j: int, p: dict, normed, routing: Routing, keep, pool, state: dc.DeviceCache,
                  include_shared):
    """Layer j's MoE output for the (token, expert) pairs with keep f32[N, K] = 1, read through its slot map."""
    view, smap = layer_view(pool, state.slot_of_expert, j, routing.experts.size, normed.dtype)  # absent: keep 0
    masked = Routing(logits=routing.logits, experts=routing.experts, weights=routing.weights * keep)
    return moe_combine(p, cfg, normed, masked, view, smap, include_shared, kernel=plan.kernel)


def moe_layer(cfg, plan: StepPlan, j: int, p: dict, h, normed, routing: Routing, real, pool, state: dc.DeviceCache,
              stack, share=_expert_share):
    """h [B, T, D] + layer j's MoE output, its experts made resident first. real bool[N]: not padding.
    share: what one pass adds (_expert_share's signature; a mesh device adds its own experts' partial sum).
    Returns (x, pool, state)."""
    E, S, policy = state.slot_of_expert.shape[1], plan.slots, plan.policy  # E: the experts this cache holds
    # a policy that prefetches: the fresh slots of j wait for its first pass to be copied (device_cache.demand)
    pending = state.fresh[j] if policy.prefetches or plan.hint_width > 0 else None
    needed = dc.needed_experts(routing.experts, real, E)               # bool[E]
    keep_real = jnp.broadcast_to(real[:, None], routing.experts.shape).astype(jnp.float32)
    state = state.replace(policy=dp.on_route(policy, state.policy, j, needed, state.slot_of_expert[j] >= 0))
    before = state.misses[j] + state.prefetch_used[j]
    if plan.max_passes == 1:  # N·K ≤ S: the union always fits
        state, pool = dc.demand(state, pool, stack, j, needed, plan.max_misses, policy, pending)
        x = h + share(cfg, plan, j, p, normed, routing, keep_real, pool, state, True).reshape(h.shape)
        return x, pool, _after_demand(plan, j, state, before)
    rank = jnp.cumsum(needed, dtype=jnp.int32) - 1                       # i32[E]: position among the needed
    chunk_of = jnp.where(needed, rank // S, -1)                          # i32[E]: the pass that computes it

    def one_pass(k, x, pool, state, include_shared, pending):
        chunk = chunk_of == k
        state, pool = dc.demand(state, pool, stack, j, chunk, plan.max_misses, policy, pending)
        keep = keep_real * chunk[routing.experts].astype(jnp.float32)
        return x + share(cfg, plan, j, p, normed, routing, keep, pool, state, include_shared).reshape(h.shape), \
            pool, state

    x, pool, state = one_pass(0, h, pool, state, True, pending)
    n_pass = jnp.maximum((needed.sum(dtype=jnp.int32) + S - 1) // S, 1)
    # the later passes copy only their own misses (the pending slots went with the first)
    x, pool, state = jax.lax.fori_loop(1, n_pass, lambda k, c: one_pass(k, *c, False, None), (x, pool, state))
    state = state.replace(tally=state.tally.at[j, dc.TALLY.index("passes")].add(n_pass - 1))
    return x, pool, _after_demand(plan, j, state, before)


def _after_demand(plan: StepPlan, j: int, state: dc.DeviceCache, before) -> dc.DeviceCache:
    """A device policy's prefetches into layer j that j did not need are wasted; its predictions are spent."""
    if plan.hint_width:  # host hints may be for the next step: they stay fresh
        return state
    used = state.misses[j] + state.prefetch_used[j] - before
    p, fresh, unused = dp.after_demand(state.policy, state.fresh[j], used)
    p = p.replace(wasted=p.wasted.at[j].add(unused))  # (j's predictions stay: nothing reads row j again)
    return state.replace(policy=p, fresh=state.fresh.at[j].set(fresh))


def _prefetch_all(plan: StepPlan, state: dc.DeviceCache, layers: range, want, prio) -> dc.DeviceCache:
    """Prefetches want bool[L', E] (priority i32[L', E]; one row per layer of `layers`, static) into those
    layers (their copies are made by each layer's demand: device_cache.demand)."""
    if len(layers) == 0:
        return state
    return dc.prefetch(state, layers, want, prio, plan.max_misses, plan.policy)


def _predict(cfg, plan: StepPlan, j: int, hidden, rows_real, scorer, state: dc.DeviceCache, L: int,
             local=None, head=None):
    """Pre-gate predictions from MoE layer j's hidden state [B, T, D] (j = −1: the embeddings) and their
    prefetches (local: a mesh device's columns, dp.predict_from); L: MoE layers. Only the H' = min(H_max,
    L − 1 − j) layers the site reaches are scored. head: (the hybrid head's parameters, cur bool[E] layer j's
    experts this step, token_ids i32[B]) when plan.policy.head is set: its logits replace the pre-gate scores
    (device_hybrid).
    Returns (state, scores f32[L, B, E] with those rows, zero elsewhere (the host twin reads only the rows
    a site reaches), or None unless plan.record)."""
    layers = range(j + 1, min(j + 1 + plan.policy.max_horizon, L))
    if plan.policy.head is None:
        scores = pregate_scores(scorer, hidden, layers)                 # f32[H', B, E]
    else:
        params, cur, token_ids = head
        scores = dh.head_scores(plan.policy.head, scorer, params, hidden, j, layers, cur, state.policy.prev,
                                token_ids)
    p = state.policy
    floor = dp.precision_floor(plan.policy, p, state.hits.sum(), state.misses.sum())
    p, want, rank = dp.predict_from(plan.policy, p, j, scores, rows_real, cfg.top_k, floor, local)
    state = _prefetch_all(plan, state.replace(policy=p), layers, want, rank)
    if not plan.record:
        return state, None
    return state, jnp.pad(scores, ((layers.start, L - layers.stop), (0, 0), (0, 0)))


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "plan"), donate_argnames=("caches", "pool", "state"))
def device_step(cfg, kinds, plan: StepPlan, params: tuple, x, caches: tuple, positions, write_idx, valid, real,
                pool, state: dc.DeviceCache, stacks: tuple, hints, scorer=None, token_ids=None, head=None):
    """Every layer of one step. x [B, T, D]; caches: per layer KV cache (donated); real bool[N]; pool: stacked slot
    pool [L, S, ...] (donated); state: DeviceCache (donated); stacks: per MoE layer pinned-host [E, W];
    hints i32[L, H] or None; scorer: the pre-gate routers (norms f32[L, D], routers f32[L, D, E], eps) of a
    scoring device policy; token_ids i32[B]: the newest token of each row (predictive, the hybrid head); head:
    the hybrid head's parameters (device_hybrid.head_args) when plan.policy.head is set, else None. Returns (x,
    caches, routings per layer, routed i32[L, N, K], hidden [L, B, D] or None, pool, state, counters i32[8, L],
    scores f32[L, L, B, E] the policy acted on, one row per scoring site (the embeddings, then MoE layers
    0 .. L − 2), with plan.record, or None)."""
    ctx = make_context(cfg, positions, write_idx, valid)
    state = dc.begin_step(state, plan.flush)
    policy, L = plan.policy, len(stacks)
    B = x.shape[0]
    rows_real = real.reshape(B, -1)[:, -1]                              # bool[B]: the newest position is real
    if hints is not None:  # first (copied by each layer's demand)
        for j in range(L):
            state = dc.apply_hints(state, j, hints[j])
    scored = ()  # f32[L, B, E] per scoring site, in step order
    if policy.scoring:  # step start: the embeddings stand in for the hidden state of "layer −1"
        state, sc = _predict(cfg, plan, -1, x, rows_real, scorer, state, L,
                             head=None if policy.head is None else (head, None, token_ids))
        scored = (sc,)
    route = route_rank = None
    if policy.kind == "predictive":
        route, route_rank = dp.route_predict(policy, state.policy, token_ids, rows_real, plan.slots)
        p = state.policy
        state = state.replace(policy=p.replace(marks=jnp.where(route, dp.LIVE | dp.PRED, 0).astype(jnp.int32)))
        h0 = range(min(policy.predict_h, L))
        state = _prefetch_all(plan, state, h0, route[:h0.stop], route_rank[:h0.stop])

    def moe(j, p, h, normed, routing, carry):
        pool, state, scored, hidden = carry
        if plan.tolerance is not None:  # cache-aware routing: prefer resident experts within δ
            routing, _ = cache_aware(cfg, routing, state.slot_of_expert[j] >= 0, plan.tolerance, real)
        x, pool, state = moe_layer(cfg, plan, j, p["mlp"], h, normed, routing, real, pool, state, stacks[j])
        # bool[E]: the layer's experts, which the route predictor and the hybrid head read
        needed = (dc.needed_experts(routing.experts, real, cfg.num_experts)
                  if policy.kind == "predictive" or policy.head is not None else None)
        if policy.kind == "predictive":
            state = state.replace(policy=dp.predictive_observe(state.policy, j, needed, token_ids, B == 1))
            t = range(j + policy.predict_h, min(j + policy.predict_h + 1, L))   # layer j + h, if there is one
            rows = slice(t.start, t.stop)
            state = _prefetch_all(plan, state, t, route[rows], route_rank[rows])
        site, head_in = h, None
        if policy.head is not None:  # the hybrid head reads j's experts now, and next step as j's last route
            state = state.replace(policy=dp.remember_route(state.policy, j, needed))  # sites read rows > j only
            site, head_in = (x if policy.head.point == "moe" else h), (head, needed, token_ids)
        if policy.scoring and j + 1 < L:
            state, sc = _predict(cfg, plan, j, site, rows_real, scorer, state, L, head=head_in)
            scored = scored + (sc,)
        if plan.hidden_point is not None:
            hidden = hidden + ((h if plan.hidden_point == "attention" else x)[:, -1],)
        return x, routing, (pool, state, scored, hidden)

    x, new_caches, routings, routed, (pool, state, scored, hidden) = walk_layers(
        cfg, kinds, params, x, caches, ctx, moe, (pool, state, scored, ()))
    state = state.replace(policy=dp.end_step(policy, state.policy, L))
    scores = jnp.stack(scored) if plan.record and scored else None
    return (x, new_caches, routings, routed, jnp.stack(hidden) if hidden else None, pool, state, state.counters(),
            scores)


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "j", "first"), donate_argnames=("pool", "state"))
def device_layer(cfg, plan: StepPlan, j: int, first: bool, p: dict, h, normed, routing: Routing, real, pool,
                 state: dc.DeviceCache, stack, hints):
    """MoE layer j alone, for a step whose hidden states are tapped between layers (the Forward's split path):
    the same cache operations as device_step, without a host sync. first: the step's first MoE layer (begins
    the step). hints i32[H] or None. Returns (x, pool, state, counters i32[5, L] (device_cache.COUNTERS))."""
    if first:
        state = dc.begin_step(state, plan.flush)
    if hints is not None:
        state = dc.apply_hints(state, j, hints)
    x, pool, state = moe_layer(cfg, plan, j, p, h, normed, routing, real, pool, state, stack)
    return x, pool, state, state.counters()
