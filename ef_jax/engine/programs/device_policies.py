"""Device policies: the expert cache's eviction order, predictions and prefetches as array operations inside the
one-program step (OffloadConfig(step="device")), over the donated DeviceCache. Nothing here syncs with the host.

step start: clear the step's predictions → [expertflow / pregate: the new tokens' embeddings act as the hidden
            state of "layer −1": score layers 0..S−1] → [predictive: the routing-path predictor's route for every
            layer from the token ids; prefetch layers 0..h−1]
MoE layer j: route → on_route: use counts, precision window, late count → demand (victims by `victim_order`)
            → after_demand: prefetches of j left unused are counted and forgotten
            → [expertflow / pregate: pregate_scores(h_j) for layers j+1..j+H_max (expertflow with a hybrid head:
               device_hybrid.head_scores, h_j at the head's point) → top-K per real row → union
               → within the horizon S and past the precision gate: kept (never evicted by a prefetch) and, when
               not resident, prefetched into their layer now] → [predictive: prefetch layer j+h]
step end:   [expertflow: k ← k + sign(late − unused); S ← clip(ceil(2^(k/4) · N_e · ratio), 1, H_max)]

Victim order (every policy): free slots, then slots whose expert is not kept (predicted for a later layer of this
step), least valuable first — LRU: oldest touch; lfu: fewest uses (all time), then oldest; expertflow: the lowest
decayed use count (c ← c − c >> 5 per layer and step, +UNIT per use), then oldest — then kept ones; never a pinned
slot (this pass's) or an expert the operation itself wants. A prefetch never evicts a kept expert, so it never
drops a prediction while an unpredicted expert is resident.

Every quantity that decides something is an integer, or a float made from integers by products, sums and
quotients (no transcendental, no fused multiply-add pattern): the host twin (ef_jax.sim.device_twin) recomputes
them in numpy bit for bit from the same routing and scores.

Axes: L MoE layers, E experts, S slots, K top-k, B rows, N tokens (B·T), V' predictor table rows, H horizon.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from ef_jax import pytree

UNIT = 1 << 10          # one use in the use counts (fixed point: decay c − c >> shift is exact)
DECAY_SHIFT = 5         # expertflow: c ← c − c >> 5 (γ ≈ 0.969; the layer mode's decayed count uses γ = 0.97)
GAIN_STEPS = 8          # k ∈ [−8, 8]: g = 2^(k/4) ∈ [1/4, 4]
PRECISION_WINDOW = 512  # the precision counters halve when a layer's predictions pass this many
GAINS = np.float32(2.0) ** (np.arange(-GAIN_STEPS, GAIN_STEPS + 1, dtype=np.float32) / np.float32(4))  # f32[17]
LIVE, PRED, FAR = 1, 2, 4  # PolicyState.marks bits
KINDS = ("nocache", "lru", "lfu", "pregate", "expertflow", "predictive")
SCORING = ("pregate", "expertflow")  # predict from hidden states with the later layers' routers


@dataclasses.dataclass(frozen=True)
class DevicePolicy:
    """The static description of a device policy (part of the step's StepPlan: hashable).

    kind: one of KINDS. max_horizon: H_max, how many later layers a hidden state is scored for (pregate: its
    fixed distance). adaptive: expertflow's horizon S moves in [1, H_max] (else S = H_max). gate: the precision
    gate. min_precision: its floor. predict_m / predict_h / table_rows: predictive's experts per row and layer,
    layers ahead, and token-id rows of its table (ids modulo it). head: expertflow's hybrid head
    (ef_jax.engine.programs.device_hybrid.HeadSpec; None: plain pre-gating, the step compiled without it)."""
    kind: str = "lru"
    max_horizon: int = 1
    adaptive: bool = False
    gate: bool = False
    min_precision: float = 0.3
    predict_m: int = 0
    predict_h: int = 2
    table_rows: int = 0
    head: object = None  # HeadSpec | None (a static option: its parameters are a step argument)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"device policy kind={self.kind!r} must be one of {KINDS}")
        if self.head is not None and self.kind != "expertflow":
            raise ValueError(f"a hybrid head is expertflow's predictor, not {self.kind!r}'s: use kind='expertflow'")
        if self.max_horizon < 1:
            raise ValueError(f"max_horizon={self.max_horizon} must be ≥ 1")

    @property
    def scoring(self) -> bool:
        return self.kind in SCORING

    @property
    def prefetches(self) -> bool:
        """Decides loads ahead of a layer's routing (predictions), whose copies wait for the layer's demand."""
        return self.kind in SCORING or self.kind == "predictive"

    @property
    def counted(self) -> bool:
        """Eviction by use counts (lfu, expertflow) rather than by recency alone."""
        return self.kind in ("lfu", "expertflow")

    @property
    def decay_shift(self) -> int:
        return DECAY_SHIFT if self.kind == "expertflow" else 0


@pytree.dataclass
class PolicyState:
    """A device policy's state, part of the DeviceCache (donated with it)."""
    count: jax.Array     # i32[L, E]: use counts, UNIT per use (expertflow: decayed per layer and step)
    marks: jax.Array     # i32[L, E]: this step's predictions for layer t, bits (one array: one update per site)
                         #   LIVE kept (predicted, gated): no prefetch evicts them; PRED predicted within the
                         #   horizon (the precision sample); FAR predicted only beyond it (a miss there is late)
    pred_n: jax.Array    # i32[L]: predictions checked at t's routing (window, halved past PRECISION_WINDOW)
    pred_hit: jax.Array  # i32[L]: of them, needed
    wasted: jax.Array    # i32[L]: prefetches not needed by the layer they were made for (cumulative)
    late: jax.Array      # i32[L]: demand misses predicted only beyond the horizon (cumulative)
    horizon: jax.Array   # i32[]: S in force
    gain: jax.Array      # i32[]: k, g = GAINS[k + GAIN_STEPS]
    ratio: jax.Array     # f32[]: calibrated copy time of one expert / one MoE layer's time (E_s / (C_s · T_l))
    n_fetch: jax.Array   # f32[]: N_e, experts fetched per layer in the last step (misses + used prefetches)
    step_late: jax.Array    # i32[]: this step's late count (feedback)
    step_unused: jax.Array  # i32[]: this step's unused prefetches (feedback)
    step_fetch: jax.Array   # i32[]: this step's misses + used prefetches
    horizon_sum: jax.Array  # i32[]: Σ S over steps (mean horizon = horizon_sum / steps)
    table: jax.Array     # i32[V', L, E]: predictive: routes seen after each token id (V' = 0 otherwise)
    prev: jax.Array      # bool[L, E]: the last step's route (predictive, and expertflow's hybrid head)


def init_policy(policy: DevicePolicy, num_layers: int, num_experts: int, ratio: float, sharding) -> PolicyState:
    L, E = num_layers, num_experts
    put = lambda a: jax.device_put(a, sharding)
    z = lambda *s, t=np.int32: put(np.zeros(s, t))
    start = 1 if policy.adaptive else policy.max_horizon
    return PolicyState(count=z(L, E), marks=z(L, E),
                       pred_n=z(L), pred_hit=z(L), wasted=z(L), late=z(L), horizon=put(np.int32(start)),
                       gain=put(np.int32(0)), ratio=put(np.float32(ratio)), n_fetch=put(np.float32(0)),
                       step_late=put(np.int32(0)), step_unused=put(np.int32(0)), step_fetch=put(np.int32(0)),
                       horizon_sum=put(np.int32(0)), table=z(policy.table_rows, L, E),
                       prev=z(L, E, t=bool))


POLICY_COUNTERS = ("wasted", "late")


# ---- eviction ---------------------------------------------------------------------------------------------------
def victim_order(eos, last, keep, kept, count, max_loads: int):
    """The max_loads best victims of one layer, best first, and how many slots a prefetch may take.

    eos i32[S] expert of each slot (-1 free); last i32[S] LRU clocks; keep bool[S] never (pinned, or holding a
    wanted expert); kept bool[S] slots whose expert is predicted for this layer (a prefetch never takes them);
    count i32[S] the slot's expert's use count (0: LRU). Returns (victims i32[M], evictable i32[] (class ≤ 1))."""
    cls = jnp.where(keep, 3, jnp.where(eos < 0, 0, jnp.where(kept, 2, 1))).astype(jnp.int32)
    S = eos.shape[0]
    slots = jnp.arange(S, dtype=jnp.int32)
    # the order of a sort on (cls, count, last, slot), as ranks from pairwise compares: a few fused elementwise
    # kernels instead of a sort and its slices (each an XLA thunk; a step runs this per layer and per site)
    c = lambda a: (a[:, None], a[None, :])                              # [S, 1] (this slot), [1, S] (another)
    (k0, o0), (k1, o1), (k2, o2), (k3, o3) = c(cls), c(count), c(last), c(slots)
    before = (o0 < k0) | ((o0 == k0) & ((o1 < k1) | ((o1 == k1) & ((o2 < k2) | ((o2 == k2) & (o3 < k3))))))
    rank = before.sum(1, dtype=jnp.int32)                               # i32[S]: a permutation of 0..S−1
    M = min(max_loads, S)
    order = jnp.where(rank[None, :] == jnp.arange(M, dtype=jnp.int32)[:, None], slots[None, :], 0).sum(1)
    return order, (cls <= 1).sum(dtype=jnp.int32)


def slot_counts(policy: DevicePolicy, pstate: PolicyState | None, j: int, eos):
    """i32[S]: the use count of each slot's expert (0 everywhere when the policy evicts by recency)."""
    if pstate is None or not policy.counted:
        return jnp.zeros_like(eos)
    return jnp.where(eos >= 0, pstate.count[j][jnp.maximum(eos, 0)], 0)


# ---- per-layer bookkeeping ----------------------------------------------------------------------------------------
def on_route(policy: DevicePolicy, p: PolicyState, j: int, needed, resident):
    """Layer j's routing is known (needed bool[E], resident bool[E] before its demand): use counts, the precision
    window of its predictions, late misses. Returns the new state."""
    count = p.count[j]
    if policy.decay_shift:
        count = count - (count >> policy.decay_shift)
    count = count + jnp.where(needed, UNIT, 0)
    p = p.replace(count=p.count.at[j].set(count))
    if not (policy.scoring or policy.kind == "predictive"):
        return p
    marks = p.marks[j]
    pred = (marks & PRED) != 0
    n = p.pred_n[j] + pred.sum(dtype=jnp.int32)
    hit = p.pred_hit[j] + (pred & needed).sum(dtype=jnp.int32)
    big = n > PRECISION_WINDOW
    n, hit = jnp.where(big, n >> 1, n), jnp.where(big, hit >> 1, hit)
    late = (needed & ~resident & ((marks & FAR) != 0) & ~pred).sum(dtype=jnp.int32)
    return p.replace(pred_n=p.pred_n.at[j].set(n), pred_hit=p.pred_hit.at[j].set(hit),
                     late=p.late.at[j].add(late), step_late=p.step_late + late)


def after_demand(p: PolicyState, fresh_j, used: jax.Array):
    """After layer j's demand passes: prefetches into j that it did not need (fresh_j bool[S]) are wasted.
    used: i32[] prefetches of j that it did need. Returns (state, the cleared fresh row)."""
    unused = fresh_j.sum(dtype=jnp.int32)
    return p.replace(step_unused=p.step_unused + unused, step_fetch=p.step_fetch + used), jnp.zeros_like(fresh_j), \
        unused


# ---- prediction ---------------------------------------------------------------------------------------------------
def top_union(scores, rows_real, k: int):
    """scores f32[..., B, E], rows_real bool[B] → (bool[..., E] ∪ of each real row's top-k, rank i32[..., E]: the
    best rank any real row gives an expert (E where none does)). Ties: the lower expert id first (lax.top_k)."""
    E = scores.shape[-1]
    _, top = jax.lax.top_k(scores, k)                                     # i32[..., B, k]
    hot = (top[..., None] == jnp.arange(E)) & rows_real[:, None, None]    # bool[..., B, k, E]
    rank = jnp.where(hot, jnp.arange(k, dtype=jnp.int32)[:, None], E).min(axis=(-3, -2))
    return rank < E, rank


def precision_floor(policy: DevicePolicy, p: PolicyState, hits, misses):
    """The break-even precision of a prefetch, f32[]: u = N_e · ratio copies per layer of compute; a right
    prefetch hides at most 1/u of a copy, a wrong one costs its copy plus, with probability h (the hit rate),
    another: prefetch when precision ≥ w / (1 + w), w = u (1 + h); never below min_precision."""
    total = hits + misses
    h = jnp.where(total > 0, hits.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32), 0.0)
    w = (p.n_fetch * p.ratio) * (1.0 + h)
    return jnp.maximum(jnp.float32(policy.min_precision), w / (1.0 + w))


def gate_pass(policy: DevicePolicy, p: PolicyState, floor):
    """bool[L]: predictions for each layer pass the precision gate (always, before any was checked)."""
    n = p.pred_n
    if not policy.gate:
        return jnp.ones(n.shape, bool)
    return (n == 0) | (p.pred_hit.astype(jnp.float32) >= floor * n.astype(jnp.float32))


def predict_from(policy: DevicePolicy, p: PolicyState, j: int, scores, rows_real, top_k: int, floor, local=None):
    """Predictions from MoE layer j's hidden state (j = −1: the embeddings) for the layers it reaches, all at
    once. scores f32[H', B, E]: the routers of layers j+1 .. j+H' (H' ≤ H_max, static; pregate_scores' rows).
    local(a, fill): a mesh device's columns of an [H', E] array (its own experts' predictions as its cache's
    ids), or None. Returns (state, want bool[H', E]: the predictions within the horizon S that pass the gate
    (kept, and prefetched where not resident), rank i32[H', E]: their priority)."""
    lo, hi = j + 1, j + 1 + scores.shape[0]                             # the rows reached (static)
    union, rank = top_union(scores, rows_real, top_k)                   # [H', E]
    if local is not None:  # the top-k is over every expert; a mesh device keeps the ones it owns
        union, rank = local(union, False), local(rank, scores.shape[-1])
    inside = jnp.asarray(np.arange(1, hi - lo + 1))[:, None] <= p.horizon  # bool[H', 1]: distance ≤ S
    take = union & inside & gate_pass(policy, p, floor)[lo:hi, None]
    bits = jnp.where(take, LIVE, 0) | jnp.where(union & inside, PRED, 0) | jnp.where(union & ~inside, FAR, 0)
    return p.replace(marks=p.marks.at[lo:hi].set(p.marks[lo:hi] | bits)), take, rank



def end_step(policy: DevicePolicy, p: PolicyState, num_layers: int) -> PolicyState:
    """Feedback: more late misses than unused prefetches → look further ahead (k + 1); fewer → nearer (k − 1).
    Then S = clip(ceil(g · N_e · ratio), 1, H_max), with N_e the experts one layer fetched in this step."""
    n_fetch = p.step_fetch.astype(jnp.float32) / jnp.float32(num_layers)
    p = p.replace(n_fetch=n_fetch, horizon_sum=p.horizon_sum + p.horizon)
    if not policy.adaptive:
        return p.replace(step_late=jnp.int32(0), step_unused=jnp.int32(0), step_fetch=jnp.int32(0))
    k = jnp.clip(p.gain + jnp.sign(p.step_late - p.step_unused), -GAIN_STEPS, GAIN_STEPS).astype(jnp.int32)
    lead = jnp.asarray(GAINS)[k + GAIN_STEPS] * (n_fetch * p.ratio)
    S = jnp.where(lead < 0.1, 1, jnp.ceil(lead).astype(jnp.int32))
    S = jnp.clip(S, 1, policy.max_horizon).astype(jnp.int32)
    return p.replace(gain=k, horizon=S, step_late=jnp.int32(0), step_unused=jnp.int32(0),
                     step_fetch=jnp.int32(0))


# ---- predictive (arXiv 2410.17954): the routing-path predictor on the device --------------------------------------
def route_predict(policy: DevicePolicy, p: PolicyState, token_ids, rows_real, slots: int):
    """Every layer's predicted experts for this step's tokens: per row and layer, the top-m experts by (routes seen
    after this token id, the last step's route, all-time use), ids ascending on ties; ∪ over the real rows, at most
    S per layer (best rank first, then lower id). token_ids i32[B]. Returns (want bool[L, E], rank i32[L, E])."""
    V, L, E = p.table.shape
    rows = p.table[jnp.mod(token_ids, V)]                                 # i32[B, L, E]
    B = rows.shape[0]
    prev = jnp.broadcast_to(p.prev.astype(jnp.int32), rows.shape)
    freq = jnp.broadcast_to(p.count, rows.shape)
    ids = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), rows.shape)
    *_, order = jax.lax.sort((-rows, -prev, -freq, ids), dimension=-1, num_keys=4)
    m = min(policy.predict_m, E, slots)
    top = order[..., :m]                                                   # i32[B, L, m]
    hot = (top[..., None] == jnp.arange(E)) & rows_real[:, None, None, None]   # bool[B, L, m, E]
    rank = jnp.where(hot, jnp.arange(m, dtype=jnp.int32)[:, None], E).min(axis=(0, 2))  # i32[L, E]
    key = rank * E + jnp.arange(E, dtype=jnp.int32)
    kth = jnp.sort(key, axis=-1)[:, min(slots, E) - 1:min(slots, E)]        # i32[L, 1]: the S-th best key
    want = (rank < E) & (key <= kth)
    return want, rank


def remember_route(p: PolicyState, j: int, needed) -> PolicyState:
    """Layer j's route this step (needed bool[E]) becomes its last route, read at j by the next step."""
    return p.replace(prev=p.prev.at[j].set(needed))


def predictive_observe(p: PolicyState, j: int, needed, token_ids, single_row: bool) -> PolicyState:
    """Layer j's route into the predictor: the last route, and (single-row steps only: a union over rows belongs
    to no token) the token's table row."""
    p = remember_route(p, j, needed)
    if single_row and p.table.shape[0]:
        row = jnp.mod(token_ids[0], p.table.shape[0])
        p = p.replace(table=p.table.at[row, j].add(needed.astype(jnp.int32)))
    return p
