"""The device step's expert cache and policies replayed on the host, in numpy: its host twin.

per recorded step (DeviceStepExperts.record(): routed i32[L, N, K], real bool[N], pre-gate scores f32[L, L, B, E],
token ids i32[B], the ratio in force) → the same decisions as ef_jax.engine.programs.device_cache /
device_policies, one layer at a time → counters i32[C, L] after each step (device_cache.COUNTERS order).

One device of an expert mesh (MeshDeviceStepExperts.record()) is the same twin over its own cache's columns
(`columns`: the global expert of each, -1 where it owns none): it needs the routed pairs of its own experts, and
takes each real row's top-k of the scores over every expert, then keeps its own columns (mesh_step.local_columns).

Written from the same rules, not the same code: loops and sorts over one layer where the device vectorises, so a
test comparing the two (tests/sim/test_device_twin.py) checks the device's array formulation decision for
decision — hits, misses, prefetches issued / used / wasted, late misses, the horizon, every slot's expert.
Imports no jax: the device policy's constants and its static description are passed in as plain values.

Axes: L MoE layers, E experts, S slots, K top-k, B rows, N tokens, M max loads of one operation.
"""
from __future__ import annotations

import math

import numpy as np

UNIT, DECAY_SHIFT, GAIN_STEPS, PRECISION_WINDOW = 1 << 10, 5, 8, 512
GAINS = np.float32(2.0) ** (np.arange(-GAIN_STEPS, GAIN_STEPS + 1, dtype=np.float32) / np.float32(4))
COUNTERS = ("hits", "misses", "prefetches", "prefetch_used", "passes", "wasted", "late", "horizon")


class DeviceTwin:
    """policy: the DevicePolicy's fields (kind, max_horizon, adaptive, gate, min_precision, predict_m, predict_h,
    table_rows) as an object with those attributes. num_experts: the columns of the cache (E). columns i32[E]: the
    global expert id of each column, -1 for a column its device does not own (a mesh device's cache; None: one
    device, column e is expert e)."""

    def __init__(self, policy, num_layers: int, num_experts: int, slots: int, top_k: int,
                 columns: np.ndarray | None = None):
        L, E, S = num_layers, num_experts, slots
        self.pol, self.L, self.E, self.S, self.K = policy, L, E, S, top_k
        if columns is not None and len(columns) != E:
            raise ValueError(f"columns has {len(columns)} entries: give one per cache column ({num_experts=})")
        self.cols = None if columns is None else np.asarray(columns, np.int64)
        self.scoring = policy.kind in ("pregate", "expertflow")
        self.counted = policy.kind in ("lfu", "expertflow")
        self.shift = DECAY_SHIFT if policy.kind == "expertflow" else 0
        self.soe = np.full((L, E), -1, np.int32)
        self.eos = np.full((L, S), -1, np.int32)
        self.last = np.full((L, S), -1, np.int32)
        self.clock = np.zeros(L, np.int32)
        self.pinned = np.zeros((L, S), bool)
        self.fresh = np.zeros((L, S), bool)
        self.c = {k: np.zeros(L, np.int64) for k in COUNTERS[:7]}
        self.count = np.zeros((L, E), np.int32)
        self.live, self.pred, self.far = (np.zeros((L, E), bool) for _ in range(3))
        self.pred_n, self.pred_hit = np.zeros(L, np.int32), np.zeros(L, np.int32)
        self.horizon = 1 if policy.adaptive else policy.max_horizon
        self.proposed = self.gated = 0  # predictions within the horizon, and of them the ones the gate held back
        self.gain, self.n_fetch = 0, np.float32(0)
        self.step_late = self.step_unused = self.step_fetch = 0
        self.table = np.zeros((policy.table_rows, L, E), np.int32)
        self.prev = np.zeros((L, E), bool)

    # ---- slot operations (one layer) --------------------------------------------------------------------------
    def _victims(self, j, keep):
        eos = self.eos[j]
        kept = (eos >= 0) & self.live[j][np.maximum(eos, 0)]
        cls = np.where(keep, 3, np.where(eos < 0, 0, np.where(kept, 2, 1)))
        cnt = np.where(eos >= 0, self.count[j][np.maximum(eos, 0)], 0) if self.counted else np.zeros_like(eos)
        order = sorted(range(self.S), key=lambda s: (cls[s], cnt[s], self.last[j, s], s))
        return order, int((cls <= 1).sum())

    def _load(self, j, want, touch, priority=None, prefetch=False):
        """Makes `want` bool[E] resident at layer j; returns (hit bool[E], n loaded, loaded slots bool[S])."""
        soe, eos = self.soe[j], self.eos[j]
        hit, miss = want & (soe >= 0), want & (soe < 0)
        keep = self.pinned[j] | ((eos >= 0) & want[np.maximum(eos, 0)])
        order, free = self._victims(j, keep)
        ids = np.arange(self.E)
        prio = ids if priority is None else priority * self.E + ids
        experts = sorted(np.flatnonzero(miss).tolist(), key=lambda e: prio[e])
        n = min(len(experts), free) if prefetch else len(experts)
        loaded = np.zeros(self.S, bool)
        new = np.zeros(self.E, bool)
        for e, s in zip(experts[:n], order[:n]):
            if eos[s] >= 0:
                soe[eos[s]] = -1
            eos[s], soe[e], loaded[s], new[e] = e, s, True, True
        touch = new if touch is None else touch
        rank = np.cumsum(touch) - 1
        for s in range(self.S):
            if eos[s] >= 0 and touch[eos[s]]:
                self.last[j, s] = self.clock[j] + rank[eos[s]]
        self.clock[j] += int(touch.sum())
        return hit, n, loaded

    def _demand(self, j, chunk):
        self.pinned[j] = False
        hit, n, loaded = self._load(j, chunk, chunk)
        eos = self.eos[j]
        held = (eos >= 0) & chunk[np.maximum(eos, 0)]
        self.pinned[j] = held
        self.c["hits"][j] += int(hit.sum())
        self.c["misses"][j] += n
        fresh = self.fresh[j] & ~loaded
        self.c["prefetch_used"][j] += int((fresh & held).sum())
        self.fresh[j] = fresh & ~held

    def _prefetch(self, layers, want, rank):
        for t in layers:
            _, n, loaded = self._load(t, want[t], None, rank[t], prefetch=True)
            self.c["prefetches"][t] += n
            self.fresh[t] |= loaded

    # ---- policy ------------------------------------------------------------------------------------------------
    def _on_route(self, j, needed):
        cnt = self.count[j]
        if self.shift:
            cnt = cnt - (cnt >> self.shift)
        self.count[j] = cnt + np.where(needed, UNIT, 0)
        if not (self.scoring or self.pol.kind == "predictive"):
            return
        pred = self.pred[j]
        n = self.pred_n[j] + int(pred.sum())
        h = self.pred_hit[j] + int((pred & needed).sum())
        if n > PRECISION_WINDOW:
            n, h = n >> 1, h >> 1
        self.pred_n[j], self.pred_hit[j] = n, h
        late = int((needed & (self.soe[j] < 0) & self.far[j] & ~pred).sum())
        self.c["late"][j] += late
        self.step_late += late

    def _floor(self, ratio):
        hits, misses = int(self.c["hits"].sum()), int(self.c["misses"].sum())
        tot = hits + misses
        h = np.float32(hits) / np.float32(max(tot, 1)) if tot > 0 else np.float32(0)
        w = (self.n_fetch * ratio) * (np.float32(1) + h)
        return max(np.float32(self.pol.min_precision), w / (np.float32(1) + w))

    def _mine(self, a, fill):
        """This cache's columns of a [..., E_all] array over every expert (`fill` where it owns none)."""
        if self.cols is None:
            return a
        return np.where(self.cols >= 0, a[..., np.maximum(self.cols, 0)], fill)

    def _needed(self, experts):
        """bool[E]: the columns the routed experts i32[N', K] (global ids) need."""
        ids = np.unique(experts)
        if self.cols is None:
            needed = np.zeros(self.E, bool)
            needed[ids] = True
            return needed
        return (self.cols >= 0) & np.isin(self.cols, ids)

    def _predict(self, j, scores, rows_real, ratio):
        """scores f32[L, B, E_all] (every expert) from MoE layer j's hidden state (−1: the embeddings)."""
        L, E, K, E_all = self.L, self.E, self.K, scores.shape[-1]
        floor = self._floor(ratio)
        want, rank = np.zeros((L, E), bool), np.full((L, E), E_all, np.int32)
        for t in range(L):
            d = t - j
            if not 1 <= d <= self.pol.max_horizon:
                continue
            best = np.full(E_all, E_all, np.int32)  # the best rank any real row gives each expert
            for b in np.flatnonzero(rows_real):
                top = np.argsort(-scores[t, b], kind="stable")[:K]
                for r, e in enumerate(top):
                    best[e] = min(best[e], r)
            rank[t] = self._mine(best, E_all)
            union = rank[t] < E_all
            inside = d <= self.horizon
            n = self.pred_n[t]
            ok = (not self.pol.gate or n == 0
                  or np.float32(self.pred_hit[t]) >= floor * np.float32(n))
            self.pred[t] |= union & inside
            self.far[t] |= union & (not inside)
            want[t] = union & inside & ok
            self.live[t] |= want[t]
            self.proposed += int((union & inside).sum())   # statistics of the gate (no decision reads them)
            self.gated += 0 if ok else int((union & inside).sum())
        self._prefetch(range(j + 1, min(j + 1 + self.pol.max_horizon, L)), want, rank)

    def _route_predict(self, tokens, rows_real):
        L, E, S = self.L, self.E, self.S
        m = min(self.pol.predict_m, E, S)
        rank = np.full((L, E), E, np.int32)
        for b in np.flatnonzero(rows_real):
            row = self.table[tokens[b] % self.table.shape[0]]
            for l in range(L):
                order = sorted(range(E), key=lambda e: (-row[l, e], -int(self.prev[l, e]), -self.count[l, e], e))
                for r, e in enumerate(order[:m]):
                    rank[l, e] = min(rank[l, e], r)
        key = rank * E + np.arange(E)
        kth = np.sort(key, axis=-1)[:, min(S, E) - 1][:, None]
        return (rank < E) & (key <= kth), rank

    def _end_step(self):
        self.n_fetch = np.float32(self.step_fetch) / np.float32(self.L)
        if self.pol.adaptive:
            self.gain = int(np.clip(self.gain + np.sign(self.step_late - self.step_unused), -GAIN_STEPS, GAIN_STEPS))
            lead = GAINS[self.gain + GAIN_STEPS] * (self.n_fetch * self.ratio)
            S = 1 if lead < np.float32(0.1) else int(math.ceil(lead))
            self.horizon = int(min(max(S, 1), self.pol.max_horizon))
        self.step_late = self.step_unused = self.step_fetch = 0

    # ---- a step ------------------------------------------------------------------------------------------------
    def step(self, routed, real, scores=None, tokens=None, ratio=0.0) -> np.ndarray:
        """One recorded step; returns the counters i32[C, L] after it (cumulative, COUNTERS order)."""
        L, E, S = self.L, self.E, self.S
        self.ratio = np.float32(ratio)
        routed, real = np.asarray(routed), np.asarray(real, bool)
        B = len(tokens) if tokens is not None else (scores.shape[2] if scores is not None else 1)
        rows_real = real.reshape(B, -1)[:, -1]
        self.pinned[:] = False
        self.live[:] = self.pred[:] = self.far[:] = False
        if self.pol.kind == "nocache":
            self.soe[:], self.eos[:], self.last[:], self.fresh[:] = -1, -1, -1, False
        src = 0
        if self.scoring:
            self._predict(-1, scores[0], rows_real, self.ratio)
            src = 1
        if self.pol.kind == "predictive":
            route, rank = self._route_predict(np.asarray(tokens), rows_real)
            self.live[:], self.pred[:] = route, route
            self._prefetch(range(min(self.pol.predict_h, L)), route, rank)
        for j in range(L):
            needed = self._needed(routed[j][real])
            self._on_route(j, needed)
            before = self.c["misses"][j] + self.c["prefetch_used"][j]
            idx = np.flatnonzero(needed)
            chunks = [idx[s:s + S] for s in range(0, max(len(idx), 1), S)]
            for chunk in chunks:
                mask = np.zeros(E, bool)
                mask[chunk] = True
                self._demand(j, mask)
            self.c["passes"][j] += len(chunks) - 1
            unused = int(self.fresh[j].sum())
            self.step_unused += unused
            self.step_fetch += int(self.c["misses"][j] + self.c["prefetch_used"][j] - before)
            self.c["wasted"][j] += unused
            self.fresh[j] = False
            self.live[j] = self.pred[j] = self.far[j] = False
            if self.pol.kind == "predictive":
                self.prev[j] = needed
                if B == 1 and self.table.shape[0]:
                    self.table[tokens[0] % self.table.shape[0], j] += needed.astype(np.int32)
                t = j + self.pol.predict_h
                if t < L:
                    self._prefetch(range(t, t + 1), route, rank)
            if self.scoring and j + 1 < L:
                self._predict(j, scores[src], rows_real, self.ratio)
                src += 1
        self._end_step()
        out = [self.c[k] for k in COUNTERS[:7]] + [np.full(L, self.horizon)]
        return np.stack(out).astype(np.int64)
