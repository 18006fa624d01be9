"""DeviceStepExperts: the expert source of `OffloadConfig(step="device")` — the cache runs inside the step program.

per step (the Forward calls begin_step, then step, then end_step):
  begin_step: the step's real-token mask; the calibrated copy/layer time ratio sent to the device when it moved
  step:       ef_jax.engine.programs.device_step.device_step — every layer, the cache state (with the policy's)
              and slot pool donated; routed experts and counters held, read when stats or the logs are asked for
  experts:    a tapped step (hidden states seen between layers): device_layer per MoE layer, same eviction

Every policy runs on the device (ef_jax.engine.programs.device_policies): lru, lfu, nocache, pregate, expertflow
(pre-gate scores of later layers from each layer's hidden state, adaptive horizon, precision gate; with a hybrid
head, PolicySpec("expertflow", predictor=HybridPredictor), the head's logits at its point instead:
ef_jax.engine.programs.device_hybrid, its parameters put on the device once and passed to every step) and
predictive (a routing-path predictor's route for every layer from the token ids). The earlier host hints one token
behind are gone: the device versions beat them (README, "Device-resident step"). A Policy object, belady, another
predictor or other host-only arguments are refused with a ValueError naming step="layer".

Telemetry: each step's counters come back with it and are read after the sampled token (no sync of their own):
per_step(), stats()["device_steps"]; record_timeline writes them as one trace event per step (_write_timeline).

Axes: L MoE layers, E experts, S slots, K top-k, N tokens of a step (B·T), H hints per layer, D model.
"""
from __future__ import annotations

import time

import numpy as np

import jax
import jax.numpy as jnp

from ef_jax.cache import plan as layer_plan
from ef_jax.cache.config import OffloadConfig
from ef_jax.engine.programs import device_cache as dc
from ef_jax.engine.programs import device_hybrid as dh
from ef_jax.engine.programs import device_policies as dp
from ef_jax.engine.sources.calibrate import RatioClock, copy_seconds, device_policy_for, hybrid_predictor
from ef_jax.engine.sources.context import policy_context
from ef_jax.engine.transfer.device_memory import resolve_budget
from ef_jax.engine.programs.device_step import StepPlan, device_layer, device_step
from ef_jax.engine.sources.base import Capabilities, SourceDefaults, SourceStats
from ef_jax.engine.transfer.store import store_for
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.engine.telemetry.timeline import Timeline, add_steps
from ef_jax.model import Model
from ef_jax.models.moe import Routing
from ef_jax.policies.pregate import PregateScorer

class DeviceStepExperts(SourceDefaults):
    """Expert cache, slot pool, copies and the policy inside the step program (see the module docstring).

    fused and whole_step: the Forward hands it the whole untapped step; a tapped step dispatches each attend_route
    itself (no chained attention) and no pre-gate scores come from attend_route (the step scores on the device)."""
    capabilities = Capabilities(offloaded=True, fused=True, whole_step=True)

    def __init__(self, model: Model, offload: OffloadConfig, counters: HostCounters,
                 kv_shape: tuple[int, int] | None = None):
        cfg = model.config
        self.cfg, self.config, self.counters = cfg, offload, counters
        self.kernel = model.expert_kernel  # the expert FFN, part of every StepPlan (a static argument)
        self.stacks = store_for(model)  # the same pinned [E, W] per-layer arrays as the layer mode
        L, E = len(cfg.moe_layer_ids), cfg.num_experts
        # budget_auto: with expert_memory="auto", what it chose and why (ef_jax.cache.auto_budget.AutoBudget)
        self.slots, self.budget_auto = resolve_budget(model, offload, self.stacks.bytes_per_expert, kv_shape,
                                                      self.stacks.device)
        self.policy, fixed_ratio = device_policy_for(offload.policy, cfg.top_k, cfg.vocab_size)
        self.policy_name = self.policy.kind
        self.flush = self.policy.kind == "nocache"
        self.hint_width, self.hidden_point = 0, None
        self.scorer_args = self.head_args = None
        if self.policy.head is not None:  # the hybrid head's routers and parameters, on the device once
            scorer, head = dh.head_args(hybrid_predictor(offload.policy), self.policy.head, L, E, cfg.hidden_size)
            self.scorer_args, self.head_args = jax.device_put((scorer, head), self.stacks.device_sharding)
        elif self.policy.scoring:  # the later layers' routers, applied on the device (layer.pregate_scores)
            self.scorer_args = jax.device_put(PregateScorer.from_context(
                self.policy.kind, policy_context(model)).stacked(), self.stacks.device_sharding)
        self.ratio_clock = None
        ratio = 0.0
        if self.policy.adaptive:
            if fixed_ratio is None:
                self.ratio_clock = RatioClock(copy_seconds(self.stacks.bytes_per_expert,
                                                           self.stacks.device_sharding,
                                                           self.stacks.device_sharding.with_memory_kind(
                                                               "pinned_host")), L)
            else:
                ratio = float(fixed_ratio)
        self.pool = self.stacks.empty_pool(self.slots)
        self.state = dc.init_cache(L, E, self.slots, self.stacks.device_sharding, self.policy, ratio)
        self.recording = False  # record(): keep what each step's policy acted on, for the host twin
        self._record: list[dict] = []
        self._ratio = ratio
        self._routing_log: list[np.ndarray] = []  # per step: experts i32[N_real, L, K] (see routing_log)
        self.counts = np.zeros((len(dc.COUNTERS), L), np.int64)  # the latest counters read back
        self._step_counts: list[np.ndarray] = []  # per step: counters i32[C, L] after it (cumulative)
        self.readbacks = self.readback_waits = 0
        # record_timeline: per held step (host time its begin_step ran, its real tokens); written by _write_timeline
        self._timed: list[tuple[float, int]] | None = [] if offload.record_timeline else None
        # the timeline's zero / the step in flight began / the last readback ended (perf_counter seconds)
        self._t0 = self._t_begin = self._t_read = time.perf_counter()
        self._pending: list = []  # (routed, counters, scores, real, step inputs) of steps not yet read
        self._real = None       # bool[N] host mask of the step in flight
        self._tokens = None     # i32[B] newest token of each row (predictive), host
        self._real_dev: dict[bytes, jax.Array] = {}
        self._layer_out: list = []  # tapped steps: per MoE layer routed experts
        self._shapes: dict = {}     # StepPlan → (kinds, argument shapes) of the programs run so far

    def record(self, on: bool = True) -> None:
        """Keep, per step, the routing, pre-gate scores, token ids and ratio the device policy acted on (the host
        twin's inputs, `decisions_log`), and with a hybrid head the hidden states its sites read (so the host
        predictor can recompute the scores). Recording returns them from the step: a different program."""
        self.recording = on

    # ---- the step --------------------------------------------------------------------------------------------
    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        """real bool[N]: which of the step's tokens are not padding."""
        if len(self._pending) >= 256:  # (bounded: every held step is ready by now)
            self._collect()
        self._t_begin = time.perf_counter()
        self._real = np.asarray(real, bool)
        self._tokens = np.asarray(last_tokens, np.int32).reshape(-1)
        if self.ratio_clock is not None:
            self.ratio_clock.finished()
            new = self.ratio_clock.update()
            if new is not None:  # the calibrated ratio moved: the device's copy of it is replaced (no sync)
                self._ratio = float(np.float32(new))
                self.state = self.state.replace(policy=self.state.policy.replace(ratio=self._ratio_on_device()))
                self.counters.dispatches += 1

    def _ratio_on_device(self) -> jax.Array:
        """The policy state's ratio f32[] as the device holds it."""
        return jax.device_put(np.float32(self._ratio), self.stacks.device_sharding)

    def step(self, kinds, params, x, caches, positions, write_idx, valid, tokens=None):
        """Every layer of the step in one program. tokens i32[B, T] on the device (the predictive policy reads
        the newest of each row). Returns (x, caches, routings per layer)."""
        plan = self._plan()
        reads_ids = self.policy.kind == "predictive" or self.policy.head is not None
        token_ids = tokens[:, -1] if reads_ids else None
        args = (tuple(params["layers"]), x, tuple(caches), positions, write_idx, valid, self._real_device(),
                self.pool, self.state, self.stacks.arrays, None, self.scorer_args, token_ids, self.head_args)
        if plan not in self._shapes:  # for step_hlo(): shapes, dtypes and memory kinds of each plan's arguments
            self._shapes[plan] = (kinds, jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), args))
        if self.ratio_clock is not None:
            self.ratio_clock.started()
        out = device_step(self.cfg, kinds, plan, *args)
        x, caches, routings, routed, hidden, self.pool, self.state, counters, scores = out
        self.counters.dispatches += 1
        self._hold(routed, counters, {"scores": scores, "hidden": hidden})
        return x, caches, routings

    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """A tapped step's MoE layer j (model layer i), on the device: no host sync; the policy's eviction order
        and counts apply, its predictions do not (they need every layer in one program). Returns (x, routing)."""
        if self.config.routing != "exact":
            raise ValueError("routing='cache-aware' with a hidden-state tap (record) is not built on the device step: "
                             "use step='layer' or routing='exact'")
        plan = self._plan()
        x, self.pool, self.state, counters = device_layer(
            self.cfg, plan, j, j == 0, p["mlp"], h, normed, routing, self._real_device(), self.pool, self.state,
            self.stacks.arrays[j], None)
        self.counters.dispatches += 1
        self._layer_out.append(routing.experts)
        if j == len(self.stacks.arrays) - 1:
            routed = jnp.stack(self._layer_out)
            self._layer_out = []
            self._hold(routed, counters, None)
        return x, routing

    def end_step(self) -> None:
        if self.config.check:
            self.verify()

    def _plan(self) -> StepPlan:
        return self._plan_for(self._real.size)

    def _plan_for(self, tokens: int) -> StepPlan:
        tol = self.config.tolerance if self.config.routing == "cache-aware" else None
        head = self.policy.head
        point = head.point if self.recording and head is not None else None  # the hybrid sites' states, recorded
        return StepPlan.for_tokens(tokens, self.cfg.num_experts, self.cfg.top_k, self.slots, 0, self.flush, point,
                                   self.policy, self.recording, tol, kernel=self.kernel)

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
    def _hold(self, routed, counters, recorded=None) -> None:
        """Holds the step's small outputs for the host (read when stats, the routing log or the decisions log are
        asked for: the sampled token already waited for the step, so reading them waits for nothing). recorded:
        while recording, what the policy acted on beyond the routing (a dict of device arrays: this step's
        pre-gate scores and, with a hybrid head, the hidden states its sites read; on a mesh each device's scores,
        ratio and slot table)."""
        inputs = {"tokens": self._tokens, "ratio": self._ratio} if self.recording else None
        self._pending.append((routed, counters, recorded, self._real, inputs))
        if self._timed is not None:
            self._timed.append((self._t_begin, int(self._real.sum())))

    def _collect(self) -> None:
        """Reads the held steps' outputs (readback_waits counts any read that found them not ready)."""
        pending, self._pending = self._pending, []
        for routed, counters, recorded, real, inputs in pending:
            self.readbacks += 1
            if not all(a.is_ready() for a in jax.tree.leaves((routed, counters, recorded))):
                self.readback_waits += 1
            experts = np.asarray(routed)                     # i32[L, N, K]
            self.counts = np.asarray(counters).astype(np.int64)
            self._step_counts.append(self.counts)
            self._routing_log.append(np.transpose(experts[:, real], (1, 0, 2)))
            if inputs is not None:  # (the device's values replace the host's: a mesh records each device's ratio)
                got = {"scores": None, "hidden": None, **jax.tree.map(np.asarray, recorded or {})}
                if got["hidden"] is not None:
                    got["hidden"] = got["hidden"].astype(np.float32)
                self._record.append(dict(inputs, routed=experts, real=real, counters=self.counts, **got))
        if pending:
            self._t_read = time.perf_counter()

    @property
    def routing_log(self) -> list[np.ndarray]:
        """Per step: experts i32[N_real, L, K] of the real tokens (for replay)."""
        self._collect()
        return self._routing_log

    @property
    def decisions_log(self) -> list[dict]:
        """Per recorded step: routed i32[L, N, K], real bool[N], scores f32[L, L, B, E] or None, tokens i32[B],
        ratio (the device's f32 value), counters i32[C, L] after the step, hidden f32[L, B, D] (with a hybrid
        head: each MoE layer's newest hidden state at the head's point) or None (see record())."""
        self._collect()
        return self._record

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

    def per_step(self) -> dict:
        """Per step, from the device counters read with each step: demand misses, prefetches issued / used /
        wasted, late misses, the horizon in force after it (the next step predicts with it), bytes copied."""
        self._collect()
        if not self._step_counts:
            return {}
        c = np.stack(self._step_counts)                           # [steps, C, L] cumulative
        d = np.diff(c, axis=0, prepend=np.zeros_like(c[:1]))
        i = {k: n for n, k in enumerate(dc.COUNTERS)}
        per = lambda k: d[:, i[k]].sum(-1).tolist()
        bpe = self.stacks.bytes_per_expert
        return {"demand_misses": per("misses"), "prefetch_issued": per("prefetches"),
                "prefetch_used": per("prefetch_used"), "prefetch_wasted": per("wasted"), "late": per("late"),
                "horizon": c[:, i["horizon"], 0].tolist(),
                "h2d_bytes": ((d[:, i["misses"]] + d[:, i["prefetches"]]).sum(-1) * bpe).tolist()}

    def stats(self) -> SourceStats:
        self._collect()
        k = {name: self.counts[n] for n, name in enumerate(dc.COUNTERS)}
        hits, misses, prefetches, used, passes = (k[n] for n in ("hits", "misses", "prefetches", "prefetch_used",
                                                                 "passes"))
        h, m, loads = int(hits.sum()), int(misses.sum()), int(misses.sum() + prefetches.sum())
        bpe = self.stacks.bytes_per_expert
        steps = len(self._step_counts)
        horizons = [int(c[dc.COUNTERS.index("horizon"), 0]) for c in self._step_counts]
        detail = {"extra_passes": int(passes.sum()), "layer_hits": hits.tolist(), "layer_misses": misses.tolist(),
                  "step_readbacks": self.readbacks, "readback_waits": self.readback_waits,
                  "cache_prefetch_wasted": int(k["wasted"].sum()), "late_misses": int(k["late"].sum()),
                  "policy_on_device": True,
                  "mean_horizon": float(np.mean(horizons)) if steps and self.policy.scoring else float("nan"),
                  "device_steps": self.per_step(), **self.stacks.host_bytes()}
        if self.ratio_clock is not None or self.policy.adaptive:
            detail["copy_layer_ratio"] = self._ratio
        if self.budget_auto is not None:
            detail["budget_auto"] = self.budget_auto.as_stats()
        self._write_timeline()
        return SourceStats(policy=self.policy_name, step="device", hits=h, misses=m, cache_loads=loads,
                           cache_demand_loads=m, cache_prefetch_issued=int(prefetches.sum()),
                           cache_prefetch_used=int(used.sum()), h2d_bytes=loads * bpe, bytes_per_expert=bpe,
                           h2d_bytes_real=loads * bpe, bytes_per_expert_real=bpe, h2d_s=0.0, stall_s=0.0,
                           compute_s=0.0, copier="in-step", clock="device", routing=self.config.routing,
                           routing_substitutions=0, slots_per_layer=self.slots,
                           expert_bytes_resident=self.slots * self.stacks.num_layers * bpe, detail=detail)

    def _write_timeline(self) -> None:
        """record_timeline: one compute event per step, args its per_step() counters, and counter graphs (misses,
        prefetches, horizon), built again from every step read so far at each write (stats() and close(), as the
        layer mode writes at stats()). A step spans host wall time from its begin_step (just before its dispatch)
        to the next step's begin_step — one token's host period, its sampled-token sync included; the last step
        ends where its counters were read. Nothing here waits for the device: the counters are the ones
        per_step() reads with the sampled token."""
        if self._timed is None:
            return
        per = self.per_step()
        starts = [t for t, _ in self._timed]
        assert len(starts) == len(per.get("late", ())), (len(starts), per)
        timeline = Timeline(t0=self._t0)
        add_steps(timeline, starts, starts[1:] + [self._t_read], [n for _, n in self._timed], per)
        timeline.write(self.config.record_timeline)

    def close(self) -> None:
        self._collect()
        self._write_timeline()
