"""The expert cache as device state: residency, LRU clocks and counters, updated inside the jitted step.

per MoE layer j, inside the step program:
  [routing] → needed bool[E] (union over the real tokens) → demand: hits / misses → victims among slots not
              holding a needed expert (ef_jax.engine.programs.device_policies.victim_order) → touch the needed
              experts (ascending id) → pinned → copy its misses and, at the first pass, the prefetches decided
              for j earlier in the step (its fresh slots) → the expert FFN reads the slots
  [a device policy's predictions] → prefetch: every later layer's predicted experts not resident, into free or
              unkept slots, vectorised over layers under one cond (device_policies.py decides what is predicted);
              the tables change now; the slots, marked fresh, are copied by their layer's demand

With lru the decisions are those of ef_jax.cache.ExpertCache with the LRU policy, made with array ops: a layer's
misses are the needed experts not resident; the victims are the n oldest evictable slots (free slots first), the
set ExpertCache picks one miss at a time; every needed expert is touched in ascending id order, a prefetched
expert when it loads. So on the same routing the hits and misses equal the simulator's
(tests/engine/test_device_step.py); every device policy equals its numpy twin (tests/sim/test_device_twin.py).

Copies: a static bound M on the misses of one pass (min(S, N·K, E)) sizes the victim and miss arrays. A prefetch
only decides (tables, `fresh`); a layer's demand copies its misses and, when the policy prefetches, its fresh
slots, in one `fori_loop` per demand pass (n ≤ S), so a hit copies nothing and a step has as many copy loops as
MoE layers, whatever its policy predicts.
Why the prefetches' copies wait for their layer: each copy loop and its guards are a few dozen XLA thunks, and
with one loop per layer a prediction site reaches, expertflow's sites doubled the step's executed thunks on the
CPU (profiled: ~1,100 more per token than lru, the loops a fifth of them); copied at the site or before the
layer's experts run, the bytes reach the slots before anything reads them, so every decision and counter is the
same. The step runs on one stream, so the copies cost the same wherever they sit in it; a prefetch whose slot is
evicted again before its layer runs is never copied. On CPU the loop is free; on a GPU a loop with a
device-valued trip count waits once per layer for that count (see the README's limits).

Axes: L MoE layers, E experts per layer, S slots per layer, H hints per layer, M max misses of one pass,
N tokens of the step, K top-k, W elements of one flat expert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ef_jax import pytree

from ef_jax.engine.programs import device_policies as dp
from ef_jax.engine.transfer.store import put_expert
from ef_jax.models.expert_blocks import guarded_loop

_NEVER = np.iinfo(np.int32).max  # LRU score of a slot that must not be evicted


@pytree.dataclass
class DeviceCache:
    """Residency and counters of every MoE layer's slots; threaded through the step program and donated."""
    slot_of_expert: jax.Array  # i32[L, E]: slot holding each expert, -1 = not resident
    expert_of_slot: jax.Array  # i32[L, S]: expert in each slot, -1 = free
    last_use: jax.Array        # i32[L, S]: LRU clock of the slot's last touch (-1 = free)
    pinned: jax.Array          # bool[L, S]: slots the step in flight holds at that layer (never evicted there)
    fresh: jax.Array           # bool[L, S]: loaded by a hint and not needed since (a prefetch not yet used)
    tally: jax.Array           # i32[L, 6]: per layer, TALLY's columns — one array, so a layer's demand or a
                               #   prediction site updates them with one write (each write is an XLA thunk)
    policy: dp.PolicyState     # the device policy's state (ef_jax.engine.programs.device_policies)

    # TALLY's columns, per layer i32[L]: the next LRU clock value (touches so far); needed experts found resident;
    # needed experts copied on demand; experts loaded by a prediction; predicted experts needed before they were
    # evicted; extra passes (a batch's union of needed experts larger than S) — all cumulative
    clock = property(lambda self: self.tally[:, 0])
    hits = property(lambda self: self.tally[:, 1])
    misses = property(lambda self: self.tally[:, 2])
    prefetches = property(lambda self: self.tally[:, 3])
    prefetch_used = property(lambda self: self.tally[:, 4])
    passes = property(lambda self: self.tally[:, 5])

    def counters(self) -> jax.Array:
        """i32[8, L]: COUNTERS in order — what the host reads once per step."""
        L = self.hits.shape[0]
        p = self.policy
        return jnp.stack([self.hits, self.misses, self.prefetches, self.prefetch_used, self.passes, p.wasted, p.late,
                          jnp.broadcast_to(p.horizon, (L,))])


TALLY = ("clock", "hits", "misses", "prefetches", "prefetch_used", "passes")


def tally_row(**added) -> jax.Array:
    """i32[6]: what one layer adds to TALLY's columns (the ones not named add 0)."""
    return jnp.stack([jnp.asarray(added.get(k, 0), jnp.int32) for k in TALLY])


COUNTERS = ("hits", "misses", "prefetches", "prefetch_used", "passes", "wasted", "late", "horizon")


def init_cache(num_layers: int, num_experts: int, slots: int, sharding, policy: dp.DevicePolicy | None = None,
               ratio: float = 0.0) -> DeviceCache:
    """Every slot free, counters zero, on the device."""
    L, E, S = num_layers, num_experts, slots
    put = lambda a: jax.device_put(a, sharding)
    return DeviceCache(slot_of_expert=put(np.full((L, E), -1, np.int32)),
                       expert_of_slot=put(np.full((L, S), -1, np.int32)),
                       last_use=put(np.full((L, S), -1, np.int32)), pinned=put(np.zeros((L, S), bool)),
                       fresh=put(np.zeros((L, S), bool)), tally=put(np.zeros((L, len(TALLY)), np.int32)),
                       policy=dp.init_policy(policy or dp.DevicePolicy(), L, E, ratio, sharding))


def begin_step(state: DeviceCache, flush: bool) -> DeviceCache:
    """Start of a step: nothing pinned; flush=True (the nocache baseline) also empties every slot."""
    p = state.policy
    state = state.replace(pinned=jnp.zeros_like(state.pinned),
                          policy=p.replace(marks=jnp.zeros_like(p.marks)))
    if flush:
        state = state.replace(slot_of_expert=jnp.full_like(state.slot_of_expert, -1),
                              expert_of_slot=jnp.full_like(state.expert_of_slot, -1),
                              last_use=jnp.full_like(state.last_use, -1), fresh=jnp.zeros_like(state.fresh))
    return state


def copy_rows(pool, stack: jax.Array, j: int, experts: jax.Array, slots: jax.Array, n: jax.Array):
    """Copies rows experts[:n] of layer j's pinned-host stack [E, W] into slots[:n] of layer j in the pool.
    `lax.dynamic_slice` of the host array at a device-computed row, then a move to device memory: XLA makes it a
    host→device copy of one row (a take/gather on host memory would run as host compute).
    Each copy runs under a `cond` (on i < n, always true): XLA's CPU backend computes bf16 slices in f32, and in a
    bare loop body it hoists that upcast of the loop-invariant stack out of the loop, materialising a float32 copy
    of every expert of the layer (seen in the step's HLO; +4.3 GiB peak RSS on a 2.2 GB store). Inside a
    conditional's branch nothing is hoisted, and the upcast fuses into the slice: only the copied row converts.
    tests/engine/test_device_cache.py checks the compiled copies hold no copy of the stack."""
    W = stack.shape[1]

    def copy(i, pool):
        row = jax.lax.dynamic_slice(stack, (experts[i], 0), (1, W))[0]
        return put_expert(pool, jax.device_put(row, jax.memory.Space.Device), jnp.int32(j), slots[i])

    return guarded_loop(n, copy, pool)


def make_resident(state: DeviceCache, j: int, want: jax.Array, touch: jax.Array | None,
                  max_loads: int, policy: dp.DevicePolicy | None = None, priority: jax.Array | None = None,
                  prefetch: bool = False, unpinned: bool = False):
    """Makes the experts `want` bool[E] of layer j resident (at most S of them). Victims (dp.victim_order): free
    slots first, then the policy's least valuable, never a slot whose expert is wanted or pinned. touch bool[E]:
    experts whose LRU clock is set, ascending id order, after the loads (None: the ones loaded). prefetch=True:
    only free or unkept slots are taken (a prefetch never evicts a prediction), so fewer may load; priority
    i32[E] (lower first, then lower id) picks which. unpinned: ignore the pins (a demand pass releases the last
    pass's). Copies nothing and counts nothing (the caller does: `demand`). Returns (state, hit bool[E] (wanted and
    already resident), n loaded, the slots loaded bool[S], experts i32[M] and victims i32[M]: load i brings
    experts[i] into slot victims[i], i < n, touched i32[] the clock values used, for the caller's tally).
    Written with compares and reductions over [M, E] / [M, S] rather than scatters (they fuse into a few kernels);
    the victim choice runs under a `cond` on "anything missing", so an all-hit layer only counts and touches. On a
    GPU that cond, like the copy loop's trip count, is a device-valued predicate (see the module docstring)."""
    policy = policy or dp.DevicePolicy()
    soe, eos, last = state.slot_of_expert[j], state.expert_of_slot[j], state.last_use[j]
    E, S = soe.shape[0], eos.shape[0]
    hit = want & (soe >= 0)
    miss = want & (soe < 0)
    keep = (eos >= 0) & want[jnp.maximum(eos, 0)]                       # bool[S]: never a victim here
    if not unpinned:
        keep = keep | state.pinned[j]
    kept = (eos >= 0) & ((state.policy.marks[j] & dp.LIVE) != 0)[jnp.maximum(eos, 0)]  # bool[S]: kept for j
    count = dp.slot_counts(policy, state.policy, j, eos)
    n = miss.sum(dtype=jnp.int32)

    def place(_):  # victims and table updates; only when something misses (an all-hit layer skips them)
        victims, free = dp.victim_order(eos, last, keep, kept, count, max_loads)  # i32[M]: best victim first
        m = jnp.minimum(n, free) if prefetch else n
        ids = jnp.arange(E, dtype=jnp.int32)
        prio = ids if priority is None else priority * E + ids
        _, experts = jax.lax.top_k(jnp.where(miss, -prio, -E * E - E), max_loads)  # i32[M]: by priority
        ok = (jnp.arange(max_loads) < m)[:, None]                        # bool[M, 1]
        to_slot = ok & (victims[:, None] == jnp.arange(S))               # bool[M, S]: load i goes to slot s
        is_new = ok & (experts[:, None] == ids)                          # bool[M, E]: load i brings expert e
        gone = ok & (eos[victims][:, None] == ids)                       # bool[M, E]: load i evicts expert e
        new_eos = jnp.where(to_slot.any(0), (to_slot * experts[:, None]).sum(0), eos)
        new_soe = jnp.where(is_new.any(0), (is_new * victims[:, None]).sum(0), jnp.where(gone.any(0), -1, soe))
        return new_soe, new_eos, victims.astype(jnp.int32), experts.astype(jnp.int32), to_slot.any(0), m, \
            is_new.any(0)

    def keep_all(_):
        none = jnp.zeros(max_loads, jnp.int32)
        return soe, eos, none, none, jnp.zeros(S, bool), jnp.int32(0), jnp.zeros(E, bool)

    soe, new_eos, victims, experts, loaded, n, new = jax.lax.cond(n > 0, place, keep_all, None)
    touch = new if touch is None else touch
    rank = jnp.cumsum(touch, dtype=jnp.int32) - 1                        # i32[E]: touch order
    e_of = jnp.maximum(new_eos, 0)
    last = jnp.where((new_eos >= 0) & touch[e_of], state.clock[j] + rank[e_of], last)
    state = state.replace(slot_of_expert=state.slot_of_expert.at[j].set(soe),
                          expert_of_slot=state.expert_of_slot.at[j].set(new_eos),
                          last_use=state.last_use.at[j].set(last))
    return state, hit, n, loaded, experts, victims, touch.sum(dtype=jnp.int32)


def copy_slots(pool, stack: jax.Array, j: int, eos, copy):
    """Copies into every slot s of layer j with copy[s] (bool[S]) its expert eos[s]'s row of the pinned-host stack
    [E, W]: one loop over those slots in ascending order, n ≤ S. Returns the pool."""
    S = copy.shape[0]
    pos = jnp.cumsum(copy, dtype=jnp.int32) - 1                           # i32[S]: rank among the copied
    ids = jnp.arange(S, dtype=jnp.int32)
    slots = jnp.where(copy[None, :] & (pos[None, :] == ids[:, None]), ids[None, :], 0).sum(1)  # i32[S]: k-th one
    return copy_rows(pool, stack, j, jnp.maximum(eos[slots], 0), slots, copy.sum(dtype=jnp.int32))


def prefetch(state: DeviceCache, layers: range, want: jax.Array, priority: jax.Array, max_loads: int,
             policy: dp.DevicePolicy) -> DeviceCache:
    """A device policy's prefetches into every layer of `layers` (static) at once: per layer t the experts
    want[t − layers.start] (want bool[L', E], one row per layer of `layers`) not resident, best priority
    i32[L', E] first (then lower id), into free or unkept slots
    (victims as make_resident orders them; a prefetch never takes a kept or pinned slot, so fewer may load). The
    loaded ones enter as most recent (touched in ascending id order) and fresh; counted in `prefetches`.
    Vectorised over the rows of `layers` (a static contiguous range: only those rows are computed), the table
    updates under one `cond` on "anything to load": a source whose predictions are all resident costs a few
    compares. The loaded slots are fresh; their layer's demand copies them (module docstring: why)."""
    lo, hi = layers.start, layers.stop                                   # only these rows are computed
    E = state.slot_of_expert.shape[1]
    S = state.expert_of_slot.shape[1]
    L = hi - lo
    cut = lambda a: a[lo:hi]
    assert want.shape[0] == priority.shape[0] == L, (want.shape, priority.shape, layers)
    soe, eos, last = cut(state.slot_of_expert), cut(state.expert_of_slot), cut(state.last_use)
    miss = want & (soe < 0)                                              # bool[L', E]
    e_of = jnp.maximum(eos, 0)
    held = lambda m: (eos >= 0) & jnp.take_along_axis(m, e_of, axis=1)  # bool[L', E] → bool[L', S] by slot
    keep, kept = cut(state.pinned) | held(want), held((cut(state.policy.marks) & dp.LIVE) != 0)
    count = (jnp.where(eos >= 0, jnp.take_along_axis(cut(state.policy.count), e_of, axis=1), 0) if policy.counted
             else jnp.zeros_like(eos))

    M = max_loads

    def place(_):  # the table updates (a site whose predictions are all resident skips them)
        victims, free = jax.vmap(lambda *a: dp.victim_order(*a, M))(eos, last, keep, kept, count)
        m = jnp.minimum(miss.sum(-1, dtype=jnp.int32), free)            # i32[L']
        ids = jnp.arange(E, dtype=jnp.int32)
        _, experts = jax.lax.top_k(jnp.where(miss, -(priority * E + ids), -E * E - E), M)  # i32[L', M]
        ok = (jnp.arange(M) < m[:, None])[:, :, None]                    # bool[L', M, 1]
        to_slot = ok & (victims[:, :, None] == jnp.arange(S))            # bool[L', M, S]
        is_new = ok & (experts[:, :, None] == ids)                       # bool[L', M, E]
        gone = ok & (jnp.take_along_axis(eos, victims, axis=1)[:, :, None] == ids)
        new_eos = jnp.where(to_slot.any(1), (to_slot * experts[:, :, None]).sum(1), eos)
        new_soe = jnp.where(is_new.any(1), (is_new * victims[:, :, None]).sum(1), jnp.where(gone.any(1), -1, soe))
        return new_soe, new_eos, m, to_slot.any(1), is_new.any(1)

    def nothing(_):
        return soe, eos, jnp.zeros(L, jnp.int32), jnp.zeros((L, S), bool), jnp.zeros((L, E), bool)

    soe, new_eos, m, loaded, new = jax.lax.cond(miss.any(), place, nothing, None)
    rank = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1                  # the loaded ones, ascending id
    ne = jnp.maximum(new_eos, 0)
    touched = (new_eos >= 0) & jnp.take_along_axis(new, ne, axis=1)
    clock = cut(state.clock)
    new_last = jnp.where(touched, clock[:, None] + jnp.take_along_axis(rank, ne, axis=1), last)
    put = lambda a, v: a.at[lo:hi].set(v)
    return state.replace(slot_of_expert=put(state.slot_of_expert, soe),
                         expert_of_slot=put(state.expert_of_slot, new_eos),
                         last_use=put(state.last_use, new_last),
                         tally=state.tally.at[lo:hi].add(jax.vmap(lambda t, n: tally_row(clock=t, prefetches=n))(
                             new.sum(-1, dtype=jnp.int32), m)),
                         fresh=put(state.fresh, cut(state.fresh) | loaded))


def apply_hints(state: DeviceCache, j: int, hints: jax.Array) -> DeviceCache:
    """Prefetch hints i32[H] for layer j (-1 = none): the hinted experts not resident are loaded (entering as most
    recent, as a host prefetch does); the hinted ones stay pinned until layer j routes, so hints never evict each
    other or an expert predicted for this step. Their copies wait for layer j's demand (they are fresh)."""
    E = state.slot_of_expert.shape[1]
    want = jnp.any(jax.nn.one_hot(hints, E, dtype=bool), axis=0)        # bool[E] (-1 rows are all false)
    miss = want & (state.slot_of_expert[j] < 0)
    state, _, n, loaded, _, _, touched = make_resident(state, j, want, miss, min(hints.shape[0], E))
    eos = state.expert_of_slot[j]
    held = (eos >= 0) & want[jnp.maximum(eos, 0)]
    return state.replace(pinned=state.pinned.at[j].set(held),
                         tally=state.tally.at[j].add(tally_row(clock=touched, prefetches=n)),
                         fresh=state.fresh.at[j].set(state.fresh[j] | loaded))


def demand(state: DeviceCache, pool, stack: jax.Array, j: int, needed: jax.Array, max_loads: int,
           policy: dp.DevicePolicy | None = None, pending: jax.Array | None = None):
    """One pass of layer j: make `needed` bool[E] (≤ S experts) resident, count hits and misses, touch them all,
    pin them for this pass (a previous pass's pins are released first), then copy these misses and the slots
    pending bool[S] (a policy that prefetches: layer j's fresh slots at its first pass, the prefetches decided for
    j this step whose bytes wait for it; None: only the misses, from the load list). Returns (state, pool)."""
    state, hit, n, loaded, experts, victims, touched = make_resident(state, j, needed, needed, max_loads, policy,
                                                                     unpinned=True)
    if pending is None:
        pool = copy_rows(pool, stack, j, experts, victims, n)
    else:  # a pending slot evicted again by this pass is loaded: copied once, with its new expert
        pool = copy_slots(pool, stack, j, state.expert_of_slot[j], pending | loaded)
    eos = state.expert_of_slot[j]
    held = (eos >= 0) & needed[jnp.maximum(eos, 0)]
    fresh = state.fresh[j] & ~loaded                                     # a demand load is no prefetch
    used = (fresh & held).sum(dtype=jnp.int32)
    return state.replace(pinned=state.pinned.at[j].set(held), fresh=state.fresh.at[j].set(fresh & ~held),
                         tally=state.tally.at[j].add(tally_row(clock=touched, hits=hit.sum(dtype=jnp.int32),
                                                               misses=n, prefetch_used=used))), pool


def needed_experts(experts: jax.Array, real: jax.Array, num_experts: int) -> jax.Array:
    """experts i32[N, K], real bool[N] → bool[E]: the union of the real tokens' experts."""
    hot = jax.nn.one_hot(experts, num_experts, dtype=bool) & real[:, None, None]   # [N, K, E]
    return jnp.any(hot, axis=(0, 1))


def verify_cache(state: DeviceCache) -> None:
    """Host-side invariant check of a DeviceCache read back to numpy (RuntimeError with a dump when broken)."""
    soe, eos = np.asarray(state.slot_of_expert), np.asarray(state.expert_of_slot)
    L, E = soe.shape
    problems = []
    for j in range(L):
        for e in range(E):
            s = soe[j, e]
            if s >= 0 and eos[j, s] != e:
                problems.append(f"layer {j}: expert {e} maps to slot {s}, which holds {eos[j, s]}")
        held = eos[j][eos[j] >= 0]
        if len(set(held.tolist())) != len(held):
            problems.append(f"layer {j}: an expert occupies two slots: {eos[j].tolist()}")
        for s, e in enumerate(eos[j].tolist()):
            if e >= 0 and soe[j, e] != s:
                problems.append(f"layer {j}: slot {s} holds {e} but the expert maps to {soe[j, e]}")
    if problems:
        raise RuntimeError("device expert cache invariant broken:\n  " + "\n  ".join(problems)
                           + f"\nslot_of_expert\n{soe}\nexpert_of_slot\n{eos}")
