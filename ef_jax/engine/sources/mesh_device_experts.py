"""MeshDeviceStepExperts: the expert source of `OffloadConfig(step="device")` on an expert mesh — every device's
cache inside one shard_mapped step program (ef_jax.engine.programs.mesh_step).

per step (the Forward calls begin_step, then step, then end_step; one program, one host sync: the sampled token):
  device d: its DeviceCache (E_max experts: its own block of every MoE layer), its slot pool of S slots per MoE
            layer, its pinned-host stack of its experts (its own memory) → copies only its own missed experts
  mesh:     attention and routers replicated; per MoE layer one psum of the devices' partial outputs
  host:     routed experts and every device's counters i32[n, C, L] held, read when stats or the logs are asked for

Everything on the host side (the held outputs, the routing log, begin_step) is the one-device device step's
(DeviceStepExperts); what differs is where the state lives (a leading device axis), the program, and the stats
(totals and `per_device`, as the layer-mode mesh reports them).

Policies: lru, lfu, nocache, pregate, expertflow — each device decides from its own experts' routing and its own
columns of the pre-gate top-k (ef_jax.cache.support.MESH_DEVICE_POLICIES); predictive's routing-path table is one
over every expert, refused by the support table, naming the fix. A calibrated copy/layer ratio (expertflow) is
measured on the first device and sent to every device. record() keeps what every device's policy acted on
(decisions_log: each device's scores, ratio and slot table per step), replayed by its host twin over its own
`columns` (ef_jax.sim.device_twin; tests/engine/test_mesh_device_step.py). The budget
(expert_memory bytes or slots_per_layer) applies to each device, as in the layer-mode mesh. One process (a mesh
over several hosts runs step="layer").

Axes: n devices, L MoE layers, E experts, E_max experts per device, S slots per device and MoE layer, C counters.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from ef_jax.cache.config import OffloadConfig
from ef_jax.engine.programs import device_cache as dc
from ef_jax.engine.programs.device_step import StepPlan
from ef_jax.engine.programs.mesh_step import MeshLayout, mesh_layer, mesh_step
from ef_jax.engine.sources.base import Capabilities, SourceStats
from ef_jax.engine.sources.calibrate import RatioClock, copy_seconds, device_policy_for
from ef_jax.engine.sources.context import policy_context
from ef_jax.engine.sources.device_experts import DeviceStepExperts
from ef_jax.engine.sources.mesh_experts import mesh_slots, mesh_stores
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.engine.transfer import residency
from ef_jax.engine.transfer.store import ExpertStore
from ef_jax.mesh import EXPERT_AXIS, check_mesh, mesh_devices, replicated
from ef_jax.model import Model
from ef_jax.models.moe import Routing
from ef_jax.policies.pregate import PregateScorer


def mesh_step_stores(model: Model, layout: MeshLayout) -> list[ExpertStore]:
    """Per device: a pinned-host ExpertStore of the E_max experts from its base (its own block, and on the last
    devices of an uneven split a few of a neighbour's, never wanted there, so every stack has one shape). An even
    split shares the layer-mode mesh's stores (one pinned copy per model)."""
    if len(set(layout.sizes)) == 1:
        return mesh_stores(model)

    def build():
        return [ExpertStore(model.experts, device=dev, experts=(b, b + layout.experts))
                for dev, b in zip(mesh_devices(model.mesh), layout.bases)]
    return residency.cached(model, "mesh_step_stores", build)


def _assemble(mesh, spec, shape, leaves, memory_kind=None):
    """One global array split over the mesh from each device's block (no copy)."""
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, spec, memory_kind=memory_kind),
                                                    list(leaves))


class MeshDeviceStepExperts(DeviceStepExperts):
    """Every device's expert cache, slots and policy inside one shard_mapped step program (module docstring)."""
    capabilities = Capabilities(offloaded=True, fused=True, whole_step=True, mesh=True)

    def __init__(self, model: Model, offload: OffloadConfig, counters: HostCounters,
                 kv_shape: tuple[int, int] | None = None):
        if jax.process_count() > 1:
            raise ValueError("step='device' on a mesh runs in one process: over several hosts use step='layer'")
        cfg = model.config
        self.cfg, self.config, self.counters, self.mesh = cfg, offload, counters, model.mesh
        self.kernel = model.expert_kernel
        self.partition = part = check_mesh(model.mesh, cfg.num_experts)
        self.layout = MeshLayout.of(model.mesh, EXPERT_AXIS, part)
        self.devices = mesh_devices(model.mesh)
        self.stores = mesh_step_stores(model, self.layout)
        n, L, E_max = part.num_devices, len(cfg.moe_layer_ids), part.max_size
        self.bytes_per_expert = bpe = self.stores[0].bytes_per_expert
        self.slots, self.budget_auto = mesh_slots(offload, L, cfg.top_k, part, bpe), None
        self.policy, fixed_ratio = device_policy_for(offload.policy, cfg.top_k, cfg.vocab_size)
        self.policy_name, self.flush = self.policy.kind, self.policy.kind == "nocache"
        self.hint_width, self.hidden_point, self.scorer_args, self.ratio_clock, self._ratio = 0, None, None, None, 0.0
        self._replicated = replicated(model.mesh)
        self._split = NamedSharding(self.mesh, P(EXPERT_AXIS))
        if self.policy.scoring:  # every later layer's router, replicated: each device keeps its own experts' top-k
            self.scorer_args = jax.device_put(PregateScorer.from_context(
                self.policy.kind, policy_context(model)).stacked(), self._replicated)
        if self.policy.adaptive:  # one copy/layer time ratio for every device (the same kind of device and link)
            if fixed_ratio is None:
                st = self.stores[0]
                self.ratio_clock = RatioClock(copy_seconds(bpe, st.device_sharding, st.host_sharding), L)
            else:
                self._ratio = float(fixed_ratio)
        self.stacks = tuple(_assemble(self.mesh, P(EXPERT_AXIS), (n * E_max,) + self.stores[0].arrays[j].shape[1:],
                                      [st.arrays[j] for st in self.stores], "pinned_host") for j in range(L))
        pools = [st.empty_pools(self.slots) for st in self.stores]
        self.pool = jax.tree.map(lambda *a: _assemble(self.mesh, P(None, EXPERT_AXIS),
                                                      (L, n * self.slots) + a[0].shape[2:], a), *pools)
        one = jax.device_get(dc.init_cache(L, E_max, self.slots, SingleDeviceSharding(self.devices[0]), self.policy,
                                           self._ratio))
        self.state = jax.device_put(jax.tree.map(lambda a: np.stack([a] * n), one), self._split)
        self.recording, self._record, self._routing_log = False, [], []
        self.counts = np.zeros((n, len(dc.COUNTERS), L), np.int64)  # the latest counters read back, per device
        self._step_counts: list[np.ndarray] = []  # per step: counters i32[n, C, L] after it (cumulative)
        self.readbacks = self.readback_waits = 0
        self._timed, self._t0, self._t_begin, self._t_read = None, 0.0, 0.0, 0.0  # no timeline (the support table)
        self._pending, self._real, self._tokens, self._real_dev, self._layer_out, self._shapes = [], None, None, \
            {}, [], {}

    @property
    def num_devices(self) -> int:
        return self.partition.num_devices

    def record(self, on: bool = True) -> None:
        """Keep, per step, what every device's policy acted on (`decisions_log`, each device's host twin's inputs):
        the step returns each device's scores, ratio and slot table besides its counters (a different program)."""
        self.recording = on

    def columns(self) -> np.ndarray:
        """i32[n, E_max]: the global expert id of each column of every device's cache, -1 where the device does
        not own it (the last devices of an uneven split: a neighbour's experts) — the host twin's `columns`."""
        ids = np.asarray(self.layout.bases)[:, None] + np.arange(self.layout.experts)     # [n, E_max]
        lo = np.asarray(self.layout.starts)[:, None]
        mine = (ids >= lo) & (ids < lo + np.asarray(self.layout.sizes)[:, None])
        return np.where(mine, ids, -1).astype(np.int32)

    @property
    def decisions_log(self) -> list[dict]:
        """Per recorded step: routed i32[L, N, K] (global ids: each device acts on the pairs of its `columns`),
        real bool[N], tokens i32[B], and per device: counters i32[n, C, L] after the step, scores f32[n, L, L, B,
        E] over every expert (None: a policy that scores nothing), ratio f32[n] in force, expert_of_slot
        i32[n, L, S] after the step. A tapped step records its routing and counters only."""
        return super().decisions_log

    # ---- the step --------------------------------------------------------------------------------------------
    def _ratio_on_device(self) -> jax.Array:
        """The calibrated copy/layer ratio for every device's policy state: f32[n]."""
        return jax.device_put(np.full(self.num_devices, self._ratio, np.float32), self._split)

    def step(self, kinds, params, x, caches, positions, write_idx, valid, tokens=None):
        """Every layer of the step in one program over the mesh. Returns (x, caches, routings per layer)."""
        if self.ratio_clock is not None:
            self.ratio_clock.started()
        out = mesh_step(self.cfg, kinds, self._plan(), self.layout, tuple(params["layers"]), x, tuple(caches),
                        positions, write_idx, valid, self._real_device(), self.pool, self.state, self.stacks,
                        self.scorer_args)
        x, caches, routings, routed, self.pool, self.state, counters = out[:7]
        self.counters.dispatches += 1
        self._hold(routed, counters, out[7] if self.recording else None)
        return x, caches, routings

    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """A tapped step's MoE layer j, every device's share on its own cache (no host sync)."""
        x, self.pool, self.state, counters = mesh_layer(
            self.cfg, self._plan(), self.layout, j, j == 0, p["mlp"], h, normed, routing, self._real_device(),
            self.pool, self.state, self.stacks[j])
        self.counters.dispatches += 1
        self._layer_out.append(routing.experts)
        if j == len(self.stacks) - 1:
            routed = jax.numpy.stack(self._layer_out)
            self._layer_out = []
            self._hold(routed, counters, None)
        return x, routing

    def _plan_for(self, tokens: int) -> StepPlan:
        """Each device's cache holds E_max experts: its plan's bounds are its own."""
        return StepPlan.for_tokens(tokens, self.layout.experts, self.cfg.top_k, self.slots, 0, self.flush, None,
                                   self.policy, self.recording, None, kernel=self.kernel)

    def _real_device(self) -> jax.Array:
        key = self._real.tobytes()
        if key not in self._real_dev:
            if len(self._real_dev) >= 64:
                self._real_dev.clear()
            self._real_dev[key] = jax.device_put(self._real, self._replicated)
            self.counters.dispatches += 1
        return self._real_dev[key]

    def step_hlo(self, tokens: int = 1) -> str:
        raise ValueError("step_hlo dumps the one-device step program; on a mesh lower mesh_step yourself")

    # ---- checks ----------------------------------------------------------------------------------------------
    def _device_pool(self, d: int):
        dev = self.devices[d]
        return jax.tree.map(lambda a: next(s.data for s in a.addressable_shards if s.device == dev), self.pool)

    def verify(self) -> None:
        """Debug check (syncs): every device's tables are consistent and its slots hold its experts' bytes."""
        state = jax.device_get(self.state)
        for d, store in enumerate(self.stores):
            mine = jax.tree.map(lambda a: a[d], state)
            dc.verify_cache(mine)
            soe = mine.slot_of_expert
            lo = self.layout.starts[d] - self.layout.bases[d]
            foreign = np.ones(soe.shape[1], bool)
            foreign[lo:lo + self.layout.sizes[d]] = False
            if (soe[:, foreign] >= 0).any():
                raise RuntimeError(f"device {d} holds an expert it does not own: slot_of_expert\n{soe}")
            store.verify(self._device_pool(d), mine.expert_of_slot)

    def resident_row(self, j: int) -> np.ndarray:
        """bool[E]: experts of MoE layer j resident on the device that owns them (a sync, off the decode path)."""
        soe = self.counters.to_host("residency", self.state.slot_of_expert[:, j])  # i32[n, E_max]
        out = np.zeros(self.cfg.num_experts, bool)
        for d, (s, size, b) in enumerate(zip(self.layout.starts, self.layout.sizes, self.layout.bases)):
            out[s:s + size] = soe[d, s - b:s - b + size] >= 0
        return out

    # ---- telemetry -------------------------------------------------------------------------------------------
    def per_step(self) -> dict:
        """Per step, summed over the devices: demand misses, prefetches issued / used / wasted, late misses, bytes
        copied; each device decides its own horizon, so horizon_per_device holds every device's in force after the
        step and horizon their mean (one number per step, as on one device)."""
        self._collect()
        if not self._step_counts:
            return {}
        every = np.stack(self._step_counts)                        # [steps, n, C, L] cumulative
        c = every.sum(1)                                           # [steps, C, L]
        d = np.diff(c, axis=0, prepend=np.zeros_like(c[:1]))
        i = {k: n for n, k in enumerate(dc.COUNTERS)}
        per = lambda k: d[:, i[k]].sum(-1).tolist()  # noqa: E731
        horizons = every[:, :, i["horizon"], 0]                    # [steps, n]
        return {"demand_misses": per("misses"), "prefetch_issued": per("prefetches"),
                "prefetch_used": per("prefetch_used"), "prefetch_wasted": per("wasted"), "late": per("late"),
                "horizon": horizons.mean(1).tolist(), "horizon_per_device": horizons.tolist(),
                "h2d_bytes": ((d[:, i["misses"]] + d[:, i["prefetches"]]).sum(-1)
                              * self.bytes_per_expert).tolist()}

    def _stats_of(self, counts: np.ndarray, **kw) -> SourceStats:
        """SourceStats from counters i32[C, L] (one device's, or their sum)."""
        k = {name: counts[n] for n, name in enumerate(dc.COUNTERS)}
        h, m, pre = int(k["hits"].sum()), int(k["misses"].sum()), int(k["prefetches"].sum())
        bpe = self.bytes_per_expert
        return SourceStats(policy=self.policy_name, step="device", hits=h, misses=m, cache_loads=m + pre,
                           cache_demand_loads=m, cache_prefetch_issued=pre,
                           cache_prefetch_used=int(k["prefetch_used"].sum()), h2d_bytes=(m + pre) * bpe,
                           bytes_per_expert=bpe, h2d_bytes_real=(m + pre) * bpe, bytes_per_expert_real=bpe,
                           h2d_s=0.0, stall_s=0.0, compute_s=0.0, copier="in-step", clock="device",
                           routing=self.config.routing, routing_substitutions=0, slots_per_layer=self.slots,
                           expert_bytes_resident=self.slots * len(self.stacks) * bpe, **kw)

    def stats(self) -> SourceStats:
        """Totals over the devices and `per_device` (hits, misses, copies of each device's own cache). mean_horizon:
        over the steps and the devices (each device's own in per_device), NaN for a policy that scores nothing, as
        on one device; copy_layer_ratio: the one ratio every device's policy is sent (adaptive expertflow)."""
        self._collect()
        c = {k: n for n, k in enumerate(dc.COUNTERS)}
        scoring = bool(self.policy.scoring and self._step_counts)
        horizons = np.stack([s[:, c["horizon"], 0] for s in self._step_counts]) if scoring else None  # [steps, n]
        per = tuple(self._stats_of(self.counts[d], detail={
            "device": str(dev), "experts": self.layout.sizes[d], "extra_passes": int(self.counts[d][c["passes"]].sum()),
            "horizon": int(self.counts[d][c["horizon"], 0]),  # the horizon in force on this device (expertflow)
            "mean_horizon": float(horizons[:, d].mean()) if scoring else float("nan")})
            for d, dev in enumerate(self.devices))
        total = self.counts.sum(0)                                   # i32[C, L] (the horizon row: meaningless)
        host = {k: sum(st.host_bytes()[k] for st in self.stores) for k in ("host_bytes_pinned", "host_bytes_mapped")}
        detail = {"extra_passes": int(total[dc.COUNTERS.index("passes")].sum()),
                  "layer_hits": total[dc.COUNTERS.index("hits")].tolist(),
                  "layer_misses": total[dc.COUNTERS.index("misses")].tolist(),
                  "step_readbacks": self.readbacks, "readback_waits": self.readback_waits,
                  "cache_prefetch_wasted": int(total[c["wasted"]].sum()), "late_misses": int(total[c["late"]].sum()),
                  "policy_on_device": True, "experts_per_device": list(self.layout.sizes),
                  "mean_horizon": float(horizons.mean()) if scoring else float("nan"),
                  "device_steps": self.per_step(), **host}
        if self.ratio_clock is not None or self.policy.adaptive:
            detail["copy_layer_ratio"] = self._ratio
        return self._stats_of(total, devices=self.num_devices, per_device=per, detail=detail)
