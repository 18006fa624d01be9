"""Expert sources: where the Forward's MoE layers get their routed experts from.

ResidentExperts:  every expert in its own device slot (identity slot map); routing and experts run in one
                  program, no host sync (the fused fast path of the layer groups).
OffloadedExperts: experts in pinned host memory, S device slots per MoE layer managed by an ExpertCache:
   per MoE layer j (model layer i), after its attend_route (the Forward's program for the first MoE layer, else
   the end of layer j−1's expert program):
   routing (+ the MoE input h for a policy tapping the attention point, or, for a pre-gating one, every layer's
   router applied to h on the device: same program, same sync) → host (the named sync point "route")
   → [trace override | cache-aware routing]
   → cache.route(j, needed) → Loads → copier (bytes into slots) ; clock (arrivals, stall)
   → [policy hidden tap (or its scores) at the attention point] → wait for demand/late copies → expert program
   (its copies and slot-table updates inside; then the next MoE layer's attend_route: one dispatch per MoE layer)
   → [policy hidden tap at the layer output] → cache.release(j)
   A layer whose needed experts have all landed, under a policy that only evicts (layer_prefetches False), is
   dispatched right after its routing is read, and cache.route's accounting runs while it computes.

Batch > 1: a layer needs the union of its real tokens' experts (pad tokens are masked out). When that union is
larger than the layer's slots, the layer runs in passes of at most S experts, each pass adding its share.
Everything the host decides is counted by ExpertCache (hits, misses, prefetch used/wasted), so the simulator can
replay the same routing and must agree.

Axes: N tokens (B·T), K top-k, E experts, S slots, L MoE layers, D model.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.cache import plan as layer_plan
from ef_jax.cache import routing as routing_rules
from ef_jax.cache.config import OffloadConfig
from ef_jax.cache.expert_cache import ExpertCache
from ef_jax.cache.host_compute import holds_prefetches
from ef_jax.cache.timing import get_timing
from ef_jax.engine.transfer.clock import VirtualClock, WallClock
from ef_jax.engine.sources.context import policy_context
from ef_jax.engine.transfer.copier import COPIERS
from ef_jax.engine.transfer.copier import bucket
from ef_jax.engine.transfer.device_memory import resolve_budget
from ef_jax.engine.programs.host_ffn import HostShare
from ef_jax.engine.programs.layer import (NextAttention, attend_route, expert_pass, offloaded_expert_pass,
                                          offloaded_expert_pass_then_attend)
from ef_jax.engine.sources.base import Capabilities, RouteOverride, SourceDefaults, SourceStats
from ef_jax.engine.transfer import residency
from ef_jax.engine.transfer.store import store_for
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.engine.telemetry.timeline import Timeline
from ef_jax.model import Model
from ef_jax.host_experts import unpack_rows
from ef_jax.models.moe import ExpertPool, Routing
from ef_jax.policies.registry import get_policy

def resident_pools(model: Model) -> tuple:
    """Per layer: an ExpertPool (or QuantExpertPool) with all E experts on the device (slot e holds expert e), in
    the host dtype, or None for dense layers. Streamed from the model's rows one MoE layer at a time (no pinned copy),
    once per model, kept in the residency cache (offloaded runs never touch it)."""
    def build():
        rows, moe = model.experts, iter(range(model.config.num_moe_layers))
        pools = []
        for i in range(model.config.num_layers):
            if not model.config.moe_layers[i]:
                pools.append(None)
                continue
            ex = unpack_rows(rows.rows(next(moe)), rows.layout)
            # device_put: a copy, where jnp.asarray would run a `stage` program per array shape
            pools.append(jax.device_put(ex) if rows.layout.quant is not None
                         else ExpertPool(**jax.device_put(dict(ex))))
            del ex
        return tuple(pools)
    return residency.cached(model, "resident", build)


def drop_resident(model: Model) -> None:
    """Frees the device copy of every expert that resident runs of `model` keep (benchmarks switching modes)."""
    residency.drop(model, "resident")


class ResidentExperts(SourceDefaults):
    """Every routed expert resident in its own slot: no host sync, no copies."""
    capabilities = Capabilities(offloaded=False, fused=True)

    def __init__(self, model: Model, counters: HostCounters):
        cfg = model.config
        self.cfg, self.counters = cfg, counters
        self.kernel = model.expert_kernel  # the expert FFN of every program here (static)
        self.pools = resident_pools(model)
        identity = jax.device_put(np.arange(cfg.num_experts, dtype=np.int32))  # a copy, not an iota program
        self.slot_maps = tuple(identity if cfg.moe_layers[i] else None for i in range(cfg.num_layers))

    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        pass

    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """The split path (a hidden-state tap asked to see between routing and experts): one expert pass."""
        keep = jnp.ones(routing.experts.shape, jnp.float32)
        self.counters.dispatches += 1
        return expert_pass(self.cfg, True, p["mlp"], h, normed, routing, keep, self.pools[i], self.slot_maps[i],
                           kernel=self.kernel), routing

    def end_step(self) -> None:
        pass

    @property
    def routing_log(self) -> list[np.ndarray]:
        return []  # nothing is logged: the routing never reaches the host

    def resident_row(self, j: int) -> np.ndarray:
        return np.ones(self.cfg.num_experts, bool)

    def stats(self) -> SourceStats:
        return SourceStats.resident(self.cfg.num_experts)


class OffloadedExperts(SourceDefaults):
    """Experts streamed from pinned host memory into S slots per MoE layer (see the module docstring).

    set_route_override (benchmarks only): route_override(step, moe_layer j, experts i32[N, K]) → i32[N, K]
    replaces the router's choice (e.g. replayed from a real trace, so a random-weight model of a real shape sees
    real routing)."""
    capabilities = Capabilities(offloaded=True, fused=False, chains_attention=True, route_override=True)

    def __init__(self, model: Model, offload: OffloadConfig, counters: HostCounters,
                 kv_shape: tuple[int, int] | None = None):
        cfg = model.config
        self.cfg, self.config, self.counters = cfg, offload, counters
        self.kernel = model.expert_kernel  # the expert FFN of every expert program (static)
        self.store = store_for(model, offload.host_memory)
        L, E = len(cfg.moe_layer_ids), cfg.num_experts
        # budget_auto: with expert_memory="auto", what it chose and why (ef_jax.cache.auto_budget.AutoBudget)
        self.slots, self.budget_auto = resolve_budget(model, offload, self.store.bytes_per_expert, kv_shape,
                                                      self.store.device)
        self.timing = get_timing(offload.timing)  # a virtual clock stands for its preset's expert size too
        policy = get_policy(offload.policy, policy_context(model))
        expert_bytes = self.timing.expert_bytes if self.timing else self.store.bytes_per_expert
        self.cache = ExpertCache(L, E, self.slots, policy, check=offload.check, bytes_per_expert=expert_bytes,
                                 hold_prefetches=holds_prefetches(offload.host_compute, self.timing is not None))
        self.timeline = Timeline() if offload.record_timeline else None
        self.copier = COPIERS[offload.copies](self.store, self.slots, counters, self.timeline)
        self.clock = (VirtualClock(self.cache, self.timing, L, E) if self.timing
                      else WallClock(self.cache, self.timeline))
        self.compute_s = 0.0
        self.routing_log: list[np.ndarray] = []  # per step: experts i32[N_real, L_moe, K] (for replay)
        self.substitutions = 0  # cache-aware routing: (token, expert) choices swapped for a resident expert
        self.route_override = None
        self._step = -1
        self._step_routes: list[np.ndarray] = []
        # the device copy of the slot table, updated inside each expert program from the loads since the last one
        self.slot_of_expert = jax.device_put(np.full((L, E), -1, np.int32), self.store.device_sharding)  # i32[L, E]
        self._updates: list[tuple[int, int, int, int]] = []  # (layer, expert, slot, evicted) not yet on the device
        self._reset = False      # the cache flushed: the device table starts over
        self._keep_real = None   # f32[N, K] on the device: 1 for real tokens (a single-pass layer's keep mask)
        self._real = None        # bool[N]: the padding mask _keep_real was made from (uploaded again on change)
        # the expert program's small arguments as device arrays made once: a host scalar or numpy argument
        # costs a host→device transfer on every call
        put = lambda a: jax.device_put(a, self.store.device_sharding)
        self._layer_index = [put(np.int32(j)) for j in range(L)]  # i32[] per MoE layer
        self._flag = {False: put(np.bool_(False)), True: put(np.bool_(True))}
        self._no_moves = put(np.zeros((0, 4), np.int32))
        self.variants: set = set()  # distinct (loads, updates, keep) shapes of the expert program: its compiles
        policy = self.cache.policy
        self._tap = policy.hidden_point if policy.wants_hidden else None  # where the policy reads hidden states
        # a pre-gating policy at the attention point: the program computing layer j's MoE input also applies every
        # layer's router to it (programs.pregate_scores), and the host reads f32[L, B, E] instead of h [B, T, D]
        scorer = policy.device_scorer if self._tap == "attention" else None
        self.scorer = None if scorer is None else jax.device_put(scorer.stacked(), self.store.device_sharding)
        self._cache_aware = offload.routing == "cache-aware"
        # a layer whose experts have all landed may be dispatched before the accounting: only when the policy sends
        # no prefetch from its layer hooks (one for the next layer must ride in this layer's program)
        self._dispatch_first = not policy.layer_prefetches and not policy.wants_hidden
        self.layers_all_hit = 0  # layers dispatched before the cache's accounting: every needed expert had landed
        # host-computed experts (ef_jax.cache.host_compute): a miss is loaded or computed on the host
        self.host_mode = offload.host_compute
        self.host = HostShare(self.store, self.timing, counters, self.host_mode) if self.host_mode != "never" else None

    def set_route_override(self, fn: RouteOverride | None) -> None:
        self.route_override = fn

    # ---- the copy seam ---------------------------------------------------------------------------------------
    def _issue(self, loads) -> None:
        if loads:
            self.copier.issue(loads)
            self.clock.issued(loads)
            self._updates += [(ld.layer, ld.expert, ld.slot, ld.evicted) for ld in loads]

    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        """real bool[N]: which of the step's tokens are not padding."""
        self.clock.poll(self.copier)
        if self.cache.policy.flush_each_step:  # begin_step flushes the table before its loads
            self._reset, self._updates = True, []
        self._issue(self.cache.begin_step(last_tokens))  # rows are left-padded: the last column is real
        if self._real is None or not np.array_equal(real, self._real):
            self._real = real.copy()
            self._keep_real = jnp.asarray(np.repeat(real.astype(np.float32)[:, None], self.cfg.top_k, axis=1))
            self.counters.dispatches += 1
        self._step += 1
        self._step_routes = []

    def end_step(self) -> None:
        self._issue(self.cache.end_step())
        self.routing_log.append(np.stack(self._step_routes, axis=1))

    # ---- one MoE layer ---------------------------------------------------------------------------------------
    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """Layer i (MoE layer j): h [B, T, D] + its MoE output, after making its experts resident.
        real bool[N]: not padding. Returns (h, the routing actually used)."""
        x, routing, _ = self.experts_then_attend(i, j, p, h, normed, routing, real, None, scores)
        return x, routing

    def experts_then_attend(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray,
                            then: NextAttention | None, scores=None):
        """experts(), with the next MoE layer's attend_route (`then`) run at the end of this layer's last expert
        program. scores: this layer's pre-gate scores f32[L, B, E] when self.scorer is set (from the program
        that computed h). Returns (h, the routing used, the next layer's Attended, or None when `then` is
        None)."""
        tap = self._tap
        t = time.perf_counter()
        if scores is not None:  # the policy's scores come back with the routing: one sync for both (same program)
            experts, observed = self.counters.to_host("route", routing.experts, scores)  # [N, K], [L, B, E]
        elif tap == "attention":  # the MoE input comes back with the routing: one sync for both (same program)
            experts, observed = self.counters.to_host("route", routing.experts, h)  # [N, K], [B, T, D]
        else:
            experts = self.counters.to_host("route", routing.experts)  # [N, K] — the one sync per MoE layer
        self.compute_s += time.perf_counter() - t
        self.clock.routed(j)
        if self._cache_aware or self.route_override is not None:
            routing, experts = self._rewrite_routing(j, routing, experts, real)
        used = experts[real]
        needed = np.unique(used)
        self.clock.poll(self.copier)
        if self._dispatch_first and len(needed) <= self.slots and self._all_landed(j, needed):
            # Every expert this layer needs is in its slot with its copy landed, and the policy only evicts:
            # nothing to decide before the compute, so dispatch it first and account while the device computes
            # (under a virtual clock the event order, and so every figure, is unchanged).
            t = time.perf_counter()
            h, nxt = self._program(j, True, p, h, normed, routing, self._keep_real, then)
            self._timed(i, 0, t, h)
            self.layers_all_hit += 1
            if self.config.check:
                self._verify()
            self._issue(self.cache.route(j, needed))  # all hits, and the policy only evicts: no loads
            self.clock.wait(j, needed, self.copier)
            self.clock.computed(j, 1)
        else:
            h, nxt = self._passes(i, j, p, h, normed, routing, experts, real, needed, then,
                                  observed if tap == "attention" else None)
        if tap == "moe":  # hidden-state predictors (pre-gating) only: the layer's output
            self._issue(self.cache.hidden(j, self.counters.to_host("hidden", h)))
        self.cache.release(j)
        self._step_routes.append(used)
        return h, routing, nxt

    def _all_landed(self, j: int, needed: np.ndarray) -> bool:
        soe, arrived = self.cache.table.slot_row(j), self.cache.arrived_row(j)
        return all(soe[e] >= 0 and arrived[e] for e in needed.tolist())

    def _passes(self, i: int, j: int, p: dict, h, normed, routing: Routing, experts: np.ndarray, real: np.ndarray,
                needed: np.ndarray, then: NextAttention | None, observed):
        """Layer j when some needed expert must be loaded (or waited for): decide the loads, then dispatch, in
        passes of at most S experts when the layer needs more. observed: what a policy tapping the attention
        point reads (host numpy: the MoE input [B, T, D], or its pre-gate scores f32[L, B, E] when self.scorer
        is set), else None.
        Returns (h, the next layer's attend_route outputs or None)."""
        K, params = experts.shape[1], p
        out = {"h": h, "nxt": None}
        host, hosted = [], None
        deferred = y_host = None
        if self.host is not None:  # each miss: load it, or compute it on the host (started here, async)
            needed, *hosted = self.host.plan(self.cache, self.clock, j, needed, experts, real)
            host = hosted[0]
            if host:
                y_host = self.host.start(j, normed, routing, experts, real, host)
                self.clock.hosted(self.host.layer_s(host, experts, real))
                if then is not None:  # the host's share joins before the next layer's attention
                    then, deferred = None, then

        def observe(_):  # behind this layer's demand loads, ahead of its expert compute
            return self.cache.scores(j, observed) if self.scorer is not None else self.cache.hidden(j, observed)

        def compute(p: layer_plan.Pass):
            chunk = p.chunks[0]
            if p.count == 1 and not host:
                keep = self._keep_real  # every needed expert is resident: only padding is masked
            else:
                keep = jnp.asarray((np.isin(experts, chunk) & real[:, None]).astype(np.float32).reshape(-1, K))
                self.counters.dispatches += 1
            t = time.perf_counter()
            out["h"], out["nxt"] = self._program(j, p.first, params, out["h"], normed, routing, keep,
                                                 then if p.last else None)
            self._timed(i, p.index, t, out["h"])
            if self.config.check:
                self._verify()
            self.clock.computed(j, p.count)
            if not p.last:
                jax.block_until_ready(out["h"])  # the next pass may evict this pass's experts: finish reading them

        layer_plan.run_layer([self.cache], j, [needed], issue=lambda _, loads: self._issue(loads), compute=compute,
                             observe=None if observed is None else observe,
                             poll=lambda _, p: self.clock.poll(self.copier) if not p.first else None,
                             wait=lambda _, chunk: self.clock.wait(j, chunk, self.copier),
                             hosted=[hosted] if hosted else None)
        if host:
            return self._join(j, out["h"], y_host, deferred)
        return out["h"], out["nxt"]

    def _join(self, j: int, h, y_host, then: NextAttention | None):
        """The host's share of layer j joins its sum (one host→device copy of f32[N, D]); then, given `then`, the
        next MoE layer's attend_route runs on the result. Returns (h, its Attended or None)."""
        h = self.host.join(h, y_host)
        self.clock.joined()
        self.counters.dispatches += 1
        if then is None:
            return h, None
        a = then.inputs
        nxt = attend_route(self.cfg, then.dense_kinds, then.kind, a.dense_params, a.params, h, then.dense_caches,
                           then.cache, a.positions, a.write_idx, a.valid, a.scorer)
        self.counters.dispatches += 1
        if self.scorer is not None:
            nxt.scores.copy_to_host_async()
        elif self._tap == "attention":
            nxt.h.copy_to_host_async()
        return h, nxt

    def _program(self, j: int, include_shared: bool, p: dict, h, normed, routing: Routing, keep,
                 then: NextAttention | None):
        """Dispatches layer j's expert program with the loads and slot-table changes queued so far (and, given
        `then`, the next MoE layer's attend_route at its end). Returns (h, that attend_route's outputs or None)."""
        bufs, dst = self.copier.take()
        upd = self._updates
        self._updates = []
        if upd:
            upd = upd + [upd[-1]] * (bucket(len(upd)) - len(upd))  # repeating the last row changes nothing
        if len(dst) or upd:  # the buffers' places, then the table's changes: one small host→device transfer
            moves = np.zeros((len(dst) + len(upd), 4), np.int32)
            moves[:len(dst), :dst.shape[1]] = dst
            moves[len(dst):] = upd
        else:
            moves = self._no_moves
        self.variants.add((len(bufs), len(upd), include_shared, keep.shape, then is None))
        args = (self.cfg, include_shared, p["mlp"], h, normed, routing, keep, self.copier.pool, self.slot_of_expert,
                self._layer_index[j], bufs, moves, self._flag[self._reset])
        if then is None:
            h, self.copier.pool, self.slot_of_expert = offloaded_expert_pass(*args, kernel=self.kernel)
            nxt = None
        else:
            h, self.copier.pool, self.slot_of_expert, nxt = offloaded_expert_pass_then_attend(
                *args, then.dense_kinds, then.kind, then.inputs, then.dense_caches, then.cache, kernel=self.kernel)
            if self.scorer is not None:
                nxt.scores.copy_to_host_async()  # read with the next layer's routing
            elif self._tap == "attention":
                nxt.h.copy_to_host_async()
        self._reset = False
        self.copier.carried(h)
        self.counters.dispatches += 1
        return h, nxt

    def resident_row(self, j: int) -> np.ndarray:
        """bool[E]: experts of MoE layer j resident (arrived or in flight)."""
        return np.asarray(self.cache.table.slot_row(j)) >= 0

    def _verify(self) -> None:
        """check=True: the cache's invariants, every slot's bytes, and the device slot table equal the host's."""
        self.copier.settle()
        self.cache.verify()
        self.store.verify(self.copier.pool, self.cache.table.expert_of_slot)
        if self._updates:  # loads issued after the last program are not on the device yet
            return
        device = np.asarray(self.slot_of_expert)
        if not np.array_equal(device, self.cache.table.slot_of_expert):
            raise RuntimeError(f"device slot table differs from the host's:\n{device}\n{self.cache.table.dump()}")

    def _rewrite_routing(self, j: int, routing: Routing, experts: np.ndarray, real: np.ndarray):
        """Trace override (benchmarks) and cache-aware routing (opt-in); exact routing passes through untouched."""
        if self.route_override is not None:
            new = np.asarray(self.route_override(self._step, j, experts), np.int32)
            if new.shape != experts.shape:
                raise ValueError(f"route_override returned shape {new.shape}, expected {experts.shape}")
            probs = routing_rules.router_probs(self.cfg, self.counters.to_host("logits", routing.logits))
            weights = routing_rules.family_weights(self.cfg, probs, new)
            routing = Routing(logits=routing.logits, experts=jnp.asarray(new), weights=jnp.asarray(weights))
            experts = new
        if self.config.routing != "cache-aware":
            return routing, experts
        resident = np.asarray(self.cache.table.slot_row(j)) >= 0
        new, weights, changed = routing_rules.cache_aware(
            self.cfg, self.counters.to_host("logits", routing.logits), experts, resident, self.config.tolerance, real)
        if weights is None:
            return routing, experts
        self.substitutions += int((new != experts).sum())
        w = np.where(changed[:, None], weights, self.counters.to_host("weights", routing.weights)).astype(np.float32)
        return Routing(logits=routing.logits, experts=jnp.asarray(new), weights=jnp.asarray(w)), new

    # ---- telemetry -------------------------------------------------------------------------------------------
    def _timed(self, i: int, n: int, t: float, out) -> None:
        """Layer i's expert program (pass n) was dispatched at t: its time (to completion, with a timeline)."""
        if self.timeline is not None:
            jax.block_until_ready(out)
            self.timeline.add(f"experts L{i}" + (f" pass {n}" if n else ""), "compute", t)
        self.compute_s += time.perf_counter() - t

    def stats(self) -> SourceStats:
        c = self.cache.stats()
        if self.timeline is not None:
            self.timeline.write(self.config.record_timeline)
        detail = {"pregate_on_device": self.scorer is not None, "expert_program_variants": len(self.variants),
                  "layers_all_hit": self.layers_all_hit, **self.store.host_bytes(),
                  "host_compute": self.host_mode, "host_computed": self.cache.host_computed,
                  "bytes_not_moved": (self.cache.host_computed - self.cache.host_behind) * self.cache.bytes_per_expert}
        detail.update({k: v for k, v in self.clock.stats().items() if k != "clock"})
        if self.host is not None:
            detail.update(self.host.stats())
        horizon = self.cache.policy.prefetch_distance()  # layers ahead; None for history-only policies
        if horizon is not None:
            detail["mean_horizon"] = float(horizon)
        detail.update({f"cache_{k}": v for k, v in c.items() if f"cache_{k}" not in SourceStats.KEYS})
        if self.budget_auto is not None:
            detail["budget_auto"] = self.budget_auto.as_stats()
        mem = self.store.device.memory_stats()  # None on CPU; on GPU the allocator's own numbers
        if mem:
            detail["device_bytes_in_use"] = mem.get("bytes_in_use")
            detail["device_peak_bytes_in_use"] = mem.get("peak_bytes_in_use")
        return cache_stats(self.cache, step="layer", copier=self.copier.name, clock=self.clock.name,
                           # bytes as the clock counts them: under a virtual clock, its preset's expert size
                           bytes_per_expert_real=self.store.bytes_per_expert, h2d_bytes_real=self.copier.bytes,
                           h2d_s=self.copier.issue_s, stall_s=self.clock.stall_s, compute_s=self.compute_s,
                           routing=self.config.routing, routing_substitutions=self.substitutions,
                           slots_per_layer=self.slots,
                           expert_bytes_resident=self.slots * self.store.num_layers * self.store.bytes_per_expert,
                           detail=detail)

    def close(self) -> None:
        self.copier.close()


def cache_stats(cache: ExpertCache, **kw) -> SourceStats:
    """SourceStats of a source whose decisions an ExpertCache counts (the layer mode, each device of a mesh)."""
    return SourceStats(policy=cache.policy.name, hits=cache.hits, misses=cache.misses, cache_loads=cache.loads,
                       cache_demand_loads=cache.demand_loads, cache_prefetch_issued=cache.prefetch_issued,
                       cache_prefetch_used=cache.prefetch_used, h2d_bytes=cache.loads * cache.bytes_per_expert,
                       bytes_per_expert=cache.bytes_per_expert, **kw)
