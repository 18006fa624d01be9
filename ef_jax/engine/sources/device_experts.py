"""DeviceStepExperts: the expert source of `OffloadConfig(step="device")` — the cache runs inside the step program.

per step (the Forward calls begin_step, then step, then end_step):
  begin_step: read the previous step's routed experts, hidden states and counters (already on the host: the
              sampled token waited for that step) → replay them through a host ExpertCache driven by the policy
              (one token behind) → its prefetch Loads become this step's hints i32[L, H]
  step:       ef_jax.engine.programs.device_step.device_step — every layer, the cache state and slot pool donated
  experts:    a tapped step (hidden states seen between layers): device_layer per MoE layer, same operations

Eviction is LRU on the device for every policy. Policies contribute prefetch hints only: "lru" sends none, "nocache"
empties the slots each step, "pregate" / "predictive" / "expertflow" keep deciding prefetches on the host, from the
routing and hidden states of the step before. What "one token behind" costs each of them is in the README
("Device-resident step"). Policies whose meaning is their own eviction rule (lfu, belady, Policy objects), and
the layer mode's options, are refused by ef_jax.cache.support before any work.

Axes: L MoE layers, E experts, S slots, K top-k, N tokens of a step (B·T), H hints per layer, D model.
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from ef_jax.cache import plan as layer_plan
from ef_jax.cache.config import OffloadConfig
from ef_jax.cache.support import HINT_POLICIES
from ef_jax.cache.expert_cache import ExpertCache
from ef_jax.engine.programs import device_cache as dc
from ef_jax.engine.sources.context import policy_context
from ef_jax.engine.transfer.device_memory import resolve_budget
from ef_jax.engine.programs.device_step import StepPlan, device_layer, device_step
from ef_jax.engine.sources.base import Capabilities, SourceDefaults, SourceStats
from ef_jax.engine.transfer.store import store_for
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.model import Model
from ef_jax.models.moe import Routing
from ef_jax.policies.registry import get_policy

class DeviceStepExperts(SourceDefaults):
    """Expert cache, slot pool and copies inside the step program (see the module docstring).

    fused and whole_step: the Forward hands it the whole untapped step; a tapped step dispatches each attend_route
    itself (no chained attention) and no pre-gate scores come from attend_route (the hint policy reads the step's
    hidden states)."""
    capabilities = Capabilities(offloaded=True, fused=True, whole_step=True)

    def __init__(self, model: Model, offload: OffloadConfig, counters: HostCounters,
                 kv_shape: tuple[int, int] | None = None):
        cfg = model.config
        self.cfg, self.config, self.counters = cfg, offload, counters
        self.stacks = store_for(model)  # the same pinned [E, W] per-layer arrays as the layer mode
        L, E = len(cfg.moe_layer_ids), cfg.num_experts
        # budget_auto: with expert_memory="auto", what it chose and why (ef_jax.cache.auto_budget.AutoBudget)
        self.slots, self.budget_auto = resolve_budget(model, offload, self.stacks.bytes_per_expert, kv_shape,
                                                      self.stacks.device)
        policy = get_policy(offload.policy, policy_context(model))
        self.policy_name = policy.name
        self.flush = bool(policy.flush_each_step)
        # the host half of a hint policy: an ExpertCache replaying each step one token behind
        self.shadow = ExpertCache(L, E, self.slots, policy) if policy.name in HINT_POLICIES else None
        self.hint_width = self.slots if self.shadow is not None else 0
        self.hidden_point = policy.hidden_point if self.shadow is not None and policy.wants_hidden else None
        self.pool = self.stacks.empty_pool(self.slots)
        self.state = dc.init_cache(L, E, self.slots, self.stacks.device_sharding)
        self._routing_log: list[np.ndarray] = []  # per step: experts i32[N_real, L, K] (see routing_log)
        self.counts = np.zeros((len(dc.COUNTERS), L), np.int64)  # the latest counters read back
        self.readbacks = self.readback_waits = self.hints_sent = 0
        self._pending: list = []  # (routed, hidden, counters, real) of steps not yet read
        self._hints = None      # i32[L, H] device array for the step in flight
        self._real = None       # bool[N] host mask of the step in flight
        self._real_dev: dict[bytes, jax.Array] = {}
        self._layer_out: list = []  # tapped steps: per MoE layer (routed, hidden)
        self._shapes: dict = {}     # StepPlan → (kinds, argument shapes) of the programs run so far
        self._queued: list[tuple[int, int]] = []  # (layer, expert) prefetches for the next step's hints

    # ---- the step --------------------------------------------------------------------------------------------
    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        """real bool[N]: which of the step's tokens are not padding."""
        if self.shadow is not None or len(self._pending) >= 256:  # (bounded: every held step is ready by now)
            self._collect()
        self._real = np.asarray(real, bool)
        if self.shadow is not None:
            self._hints = self._next_hints(last_tokens)

    def step(self, kinds, params, x, caches, positions, write_idx, valid):
        """Every layer of the step in one program. Returns (x, caches, routings per layer)."""
        plan = self._plan()
        args = (tuple(params["layers"]), x, tuple(caches), positions, write_idx, valid, self._real_device(),
                self.pool, self.state, self.stacks.arrays, self._hints)
        if plan not in self._shapes:  # for step_hlo(): shapes, dtypes and memory kinds of each plan's arguments
            self._shapes[plan] = (kinds, jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), args))
        out = device_step(self.cfg, kinds, plan, *args)
        x, caches, routings, routed, hidden, self.pool, self.state, counters = out
        self.counters.dispatches += 1
        self._hold(routed, hidden, counters)
        return x, caches, routings

    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """A tapped step's MoE layer j (model layer i), on the device: no host sync. Returns (x, routing)."""
        plan = self._plan()
        hints = None if self._hints is None else self._hints[j]
        x, self.pool, self.state, counters = device_layer(
            self.cfg, plan, j, j == 0, p["mlp"], h, normed, routing, self._real_device(), self.pool, self.state,
            self.stacks.arrays[j], hints)
        self.counters.dispatches += 1
        self._layer_out.append((routing.experts, (h if self.hidden_point == "attention" else x)[:, -1]))
        if j == len(self.stacks.arrays) - 1:
            routed = jnp.stack([r for r, _ in self._layer_out])
            hidden = jnp.stack([hd for _, hd in self._layer_out]) if self.hidden_point else None
            self._layer_out = []
            self._hold(routed, hidden, counters)
        return x, routing

    def end_step(self) -> None:
        if self.config.check:
            self.verify()

    def _plan(self) -> StepPlan:
        return self._plan_for(self._real.size)

    def _plan_for(self, tokens: int) -> StepPlan:
        return StepPlan.for_tokens(tokens, self.cfg.num_experts, self.cfg.top_k, self.slots, self.hint_width,
                                   self.flush, self.hidden_point)

    def _real_device(self) -> jax.Array:
        key = self._real.tobytes()
        arr = self._real_dev.get(key)
        if arr is None:  # a handful of masks per run (all real, and the prompts' padding): uploaded once each
            if len(self._real_dev) >= 64:  # a server sees many paddings: keep the cache bounded
                self._real_dev.clear()
            arr = self._real_dev[key] = jax.device_put(self._real, self.stacks.device_sharding)
            self.counters.dispatches += 1
        return arr

    # ---- what comes back once per step -------------------------------------------------------------------------
    def _hold(self, routed, hidden, counters) -> None:
        """Holds the step's small outputs for the host: a hint policy reads them at the next step (their copies
        start now), other policies when stats or the routing log are asked for."""
        if self.shadow is not None:  # read at the next step: start the copies now
            for a in (routed, hidden, counters):
                if a is not None:
                    a.copy_to_host_async()
        self._pending.append((routed, hidden, counters, self._real))

    def _collect(self) -> None:
        """Reads the held steps' outputs. The decode loop synced each step's sampled token, so they are ready when
        read: no wait (readback_waits counts any read that found them not ready). A hint policy reads every step
        (its replay makes the next hints); otherwise reads wait for stats() or routing_log, off the decode path."""
        pending, self._pending = self._pending, []
        for routed, hidden, counters, real in pending:
            self.readbacks += 1
            if not all(a.is_ready() for a in (routed, hidden, counters) if a is not None):
                self.readback_waits += 1
            experts = np.asarray(routed)                     # i32[L, N, K]
            self.counts = np.asarray(counters).astype(np.int64)
            self._routing_log.append(np.transpose(experts[:, real], (1, 0, 2)))
            if self.shadow is not None:
                self._replay(experts, None if hidden is None else np.asarray(hidden), real)

    @property
    def routing_log(self) -> list[np.ndarray]:
        """Per step: experts i32[N_real, L, K] of the real tokens (for replay)."""
        self._collect()
        return self._routing_log

    # ---- hints: the host policy, one token behind --------------------------------------------------------------
    def _replay(self, experts: np.ndarray, hidden: np.ndarray | None, real: np.ndarray) -> None:
        """The last step's layer events through the shadow cache (as the layer mode calls them); the prefetch
        Loads it returns are queued as hints."""
        shadow = self.shadow
        point = shadow.policy.hidden_point if hidden is not None else None
        for j in range(experts.shape[0]):
            layer_plan.run_layer([shadow], j, [np.unique(experts[j][real])], issue=lambda _, loads: self._queue(loads),
                                 compute=lambda p: shadow.arrive_all(),
                                 observe=(lambda _: shadow.hidden(j, hidden[j])) if point == "attention" else None)
            if point == "moe":
                self._queue(shadow.hidden(j, hidden[j]))
            shadow.release(j)
        self._queue(shadow.end_step())

    def _queue(self, loads) -> None:
        self._queued += [(ld.layer, ld.expert) for ld in loads if ld.kind == "prefetch"]

    def _next_hints(self, last_tokens: np.ndarray) -> jax.Array:
        """This step's hints: what the policy prefetched while replaying the last step, plus its step-start
        prefetches for this one (the current token is known: those are not behind). i32[L, H], -1 = none."""
        self._queue(self.shadow.begin_step(last_tokens))
        self.shadow.arrive_all()
        L, H = len(self.stacks.arrays), self.hint_width
        hints = np.full((L, H), -1, np.int32)
        fill = np.zeros(L, np.int64)
        for layer, expert in dict.fromkeys(self._queued):
            if fill[layer] < H:
                hints[layer, fill[layer]] = expert
                fill[layer] += 1
        self.hints_sent += int(fill.sum())
        self._queued = []
        self.counters.dispatches += 1
        return jax.device_put(hints, self.stacks.device_sharding)

    # ---- telemetry -------------------------------------------------------------------------------------------
    def step_hlo(self, tokens: int = 1) -> str:
        """The optimized HLO text of the step program that ran with `tokens` tokens (B·T; 1 = batch-1 decode):
        the evidence of what XLA made of the in-program host slices (compiles it again)."""
        plan = self._plan_for(tokens)
        if plan not in self._shapes:
            raise ValueError(f"no step of {tokens} tokens has run (ran {len(self._shapes)} other step shapes)")
        kinds, shapes = self._shapes[plan]
        return device_step.lower(self.cfg, kinds, plan, *shapes).compile().as_text()

    def verify(self) -> None:
        """Debug check (syncs): the device tables are consistent and every occupied slot holds its expert's bytes."""
        state = jax.device_get(self.state)
        dc.verify_cache(state)
        self.stacks.verify(self.pool, state.expert_of_slot)

    def resident_row(self, j: int) -> np.ndarray:
        """bool[E]: experts of MoE layer j resident now (reads the device table: a sync, off the decode path)."""
        return self.counters.to_host("residency", self.state.slot_of_expert[j]) >= 0

    def stats(self) -> SourceStats:
        self._collect()
        hits, misses, prefetches, used, passes = (self.counts[i] for i in range(len(dc.COUNTERS)))
        h, m, loads = int(hits.sum()), int(misses.sum()), int(misses.sum() + prefetches.sum())
        bpe = self.stacks.bytes_per_expert
        detail = {"extra_passes": int(passes.sum()), "layer_hits": hits.tolist(), "layer_misses": misses.tolist(),
                  "step_readbacks": self.readbacks, "readback_waits": self.readback_waits,
                  "hints_sent": self.hints_sent,
                  **self.stacks.host_bytes()}
        if self.shadow is not None:
            detail["shadow_prefetch_issued"] = self.shadow.prefetch_issued
        if self.budget_auto is not None:
            detail["budget_auto"] = self.budget_auto.as_stats()
        return SourceStats(policy=self.policy_name, step="device", hits=h, misses=m, cache_loads=loads,
                           cache_demand_loads=m, cache_prefetch_issued=int(prefetches.sum()),
                           cache_prefetch_used=int(used.sum()), h2d_bytes=loads * bpe, bytes_per_expert=bpe,
                           h2d_bytes_real=loads * bpe, bytes_per_expert_real=bpe, h2d_s=0.0, stall_s=0.0,
                           compute_s=0.0, copier="in-step", clock="device", routing=self.config.routing,
                           routing_substitutions=0, slots_per_layer=self.slots,
                           expert_bytes_resident=self.slots * self.stacks.num_layers * bpe, detail=detail)

    def close(self) -> None:
        self._collect()
