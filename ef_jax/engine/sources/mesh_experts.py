"""Expert sources over a mesh (ef_jax.mesh): each device of the `expert` axis holds, caches and computes its own share
of every MoE layer's routed experts (ef_jax.cache.partition); the Forward and the decode loop are the same.

MeshResidentExperts:  device d holds its E_d experts of every MoE layer in a block of a pool split over the mesh
                      (MeshPool, per-layer layout [n·E_max, ...]); the fused layer groups run as on one device, the
                      expert FFN as a shard_map (ef_jax.models.expert_parallel).
MeshOffloadedExperts: device d has its own pinned-host ExpertStore of its experts, its own slot pool of S slots per
                      MoE layer, its own ExpertCache + policy + copier + wall clock. Per MoE layer:
   routing → host (the one sync, "route") → needed experts split by owner → each device's cache routes its share
   → its Loads copied into its own pool (device_put on that device + a donated slot write) → the device pools seen
   as one MeshPool (stacked layout [L, n·S, ...], no copy) → one expert program over the mesh
   A device whose share exceeds S runs extra passes; the program runs max over devices of their pass counts.

Several processes (jax.distributed, one mesh over every host's devices): each process pins, copies and verifies the
experts of its own devices only, and runs every device's cache (the same routing everywhere, so the same decisions:
the slot table each program reads is identical in every process); another process's copies count as landed.

The budget (expert_memory or slots_per_layer) applies to each device. Telemetry is per device and in total
(stats()["per_device"]). The simulator replays the same split with ef_jax.sim.mesh.replay_mesh.

Limits (refused before any work by ef_jax.cache.support, naming the fix): policies lru, lfu, nocache by name (a
predictor sees every expert, a device's cache only its own); exact routing; the wall clock; no timeline;
step="layer"; expert_memory as bytes or slots (not "auto"); no route override. Copies are inline device_puts on
each device (`transfers` is for one device, and refused here).

Axes: L MoE layers, E experts, n devices, E_d experts of device d, S slots per device and MoE layer, N tokens, K top-k.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ef_jax.cache import plan as layer_plan
from ef_jax.cache.config import OffloadConfig, parse_bytes
from ef_jax.cache.expert_cache import ExpertCache
from ef_jax.engine.transfer.clock import WallClock
from ef_jax.engine.transfer.copier import InlineCopier
from ef_jax.engine.sources.base import Capabilities, SourceDefaults, SourceStats
from ef_jax.engine.sources.experts import ResidentExperts, cache_stats
from ef_jax.engine.programs.layer import expert_pass
from ef_jax.engine.transfer import residency
from ef_jax.engine.transfer.store import ExpertStore
from ef_jax.host_experts import unpack_rows
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.mesh import EXPERT_AXIS, check_mesh, mesh_devices, replicated
from ef_jax.model import Model
from ef_jax.models.expert_parallel import MeshPool
from ef_jax.models.moe import Routing
from ef_jax.policies.registry import get_policy


def _padded(experts, partition, rows: int):
    """One layer's experts laid out as n blocks of `rows` rows (device d's experts first in block d, zeros after)."""
    def leaf(a):
        out = np.zeros((partition.num_devices * rows,) + a.shape[1:], a.dtype)
        for d in range(partition.num_devices):
            s, n = partition.starts[d], partition.sizes[d]
            out[d * rows:d * rows + n] = a[s:s + n]
        return out
    if isinstance(experts, dict):
        from ef_jax.models.moe import ExpertPool
        return ExpertPool(**{k: leaf(v) for k, v in experts.items()})
    return jax.tree.map(leaf, experts)


def mesh_resident_pools(model: Model) -> tuple:
    """Per layer: a MeshPool whose block d holds device d's experts (uploaded once per model, one MoE layer's rows
    on the host at a time), or None (dense)."""
    def build():
        part = check_mesh(model.mesh, model.config.num_experts)
        split = NamedSharding(model.mesh, PartitionSpec(EXPERT_AXIS))
        rows, moe, pools = model.experts, iter(range(model.config.num_moe_layers)), []
        for i in range(model.config.num_layers):
            if not model.config.moe_layers[i]:
                pools.append(None)
                continue
            ex = _padded(unpack_rows(rows.rows(next(moe)), rows.layout), part, part.max_size)
            pools.append(MeshPool(pool=jax.device_put(ex, split), layer=None, mesh=model.mesh, axis=EXPERT_AXIS,
                                  owner=tuple(int(o) for o in part.owner)))
            del ex
        return tuple(pools)
    return residency.cached(model, "mesh_resident", build)


def mesh_stores(model: Model) -> list[ExpertStore | None]:
    """Per device of the mesh: the pinned-host ExpertStore of its own experts of every MoE layer (built once, each
    streamed from the model's rows: the experts are pinned once in all, each on its owner's host memory), or None for
    a device of another process (several hosts: each process pins the experts of its own devices)."""
    def build():
        part = check_mesh(model.mesh, model.config.num_experts)
        return [ExpertStore(model.experts, device=dev, experts=(part.starts[d], part.starts[d] + part.sizes[d]))
                if dev.process_index == jax.process_index() else None
                for d, dev in enumerate(mesh_devices(model.mesh))]
    return residency.cached(model, "mesh_stores", build)


class MeshResidentExperts(ResidentExperts):
    """Every routed expert resident, each on the device that owns it."""
    capabilities = Capabilities(offloaded=False, fused=True, mesh=True)

    def __init__(self, model: Model, counters: HostCounters):
        cfg = model.config
        self.cfg, self.counters = cfg, counters
        self.kernel = model.expert_kernel  # each device's expert FFN (static)
        self.partition = check_mesh(model.mesh, cfg.num_experts)
        self.pools = mesh_resident_pools(model)
        local = jax.device_put(self.partition.local, replicated(model.mesh))  # i32[E]: slot in the owner's block
        self.slot_maps = tuple(local if cfg.moe_layers[i] else None for i in range(cfg.num_layers))

    def stats(self) -> SourceStats:
        return dataclasses.replace(SourceStats.resident(self.partition.max_size,
                                                        experts_per_device=list(self.partition.sizes)),
                                   devices=self.partition.num_devices)


def mesh_slots(offload: OffloadConfig, num_moe_layers: int, top_k: int, partition, bytes_per_expert: int) -> int:
    """Slots per MoE layer on every device. One token's top-k may all belong to one device, so each device needs
    min(K, E_max) slots; more than E_max would never be used."""
    if offload.slots_per_layer is not None:
        slots = offload.slots_per_layer
    else:
        slots = parse_bytes(offload.expert_memory) // (bytes_per_expert * num_moe_layers)
    need = min(top_k, partition.max_size)
    if slots < need:
        nbytes = need * bytes_per_expert * num_moe_layers
        raise ValueError(f"expert budget too small: {slots} slot{'' if slots == 1 else 's'} per MoE layer on each "
                         f"device, but one token's top-{top_k} experts may all live on one device (it owns up to "
                         f"{partition.max_size}); the minimum is {need} slots per layer = {nbytes:,} bytes "
                         f"({nbytes / 2**20:.1f} MiB) per device")
    return min(slots, partition.max_size)


class MeshOffloadedExperts(SourceDefaults):
    """Each device streams its own experts into its own slots (see the module docstring). Each MoE layer's
    attend_route is its own program (no chained attention) and returns no pre-gate scores."""
    capabilities = Capabilities(offloaded=True, fused=False, mesh=True)

    def __init__(self, model: Model, offload: OffloadConfig, counters: HostCounters,
                 kv_shape: tuple[int, int] | None = None):
        cfg = model.config
        self.cfg, self.config, self.counters, self.mesh = cfg, offload, counters, model.mesh
        self.kernel = model.expert_kernel  # each device's expert FFN (static)
        self.partition = part = check_mesh(model.mesh, cfg.num_experts)
        self.stores = mesh_stores(model)
        self.devices = mesh_devices(model.mesh)
        L = len(cfg.moe_layer_ids)
        bpe = next(st for st in self.stores if st is not None).bytes_per_expert
        self.bytes_per_expert, self.num_moe_layers = bpe, L
        self.slots = mesh_slots(offload, L, cfg.top_k, part, bpe)
        self.budget_auto = None
        self.caches = [ExpertCache(L, part.sizes[d], min(self.slots, part.sizes[d]), get_policy(offload.policy),
                                   check=offload.check, bytes_per_expert=bpe) for d in range(part.num_devices)]
        # a device of another process: its cache runs here too (same routing, same decisions: the slot table every
        # program reads), while its owner copies the bytes
        self.copiers = [None if st is None else InlineCopier(st, self.slots, counters) for st in self.stores]
        self.clocks = [WallClock(cache) for cache in self.caches]
        self.owner = tuple(int(o) for o in part.owner)
        self._pool_sharding = NamedSharding(model.mesh, PartitionSpec(None, EXPERT_AXIS))
        self.compute_s = 0.0
        self.routing_log: list[np.ndarray] = []  # per step: experts i32[N_real, L_moe, K] (for replay)
        self._step_routes: list[np.ndarray] = []
        self._keep_real = None

    @property
    def num_devices(self) -> int:
        return self.partition.num_devices

    def _issue(self, d: int, loads) -> None:
        if not loads:
            return
        if self.copiers[d] is None:  # another process's device: mirror its cache (demand copies land before use)
            for ld in loads:
                self.caches[d].arrive(ld.layer, ld.expert)
            return
        self.copiers[d].issue(loads)
        self.clocks[d].issued(loads)

    def _local(self) -> list[int]:
        return [d for d, c in enumerate(self.copiers) if c is not None]

    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        for d in self._local():
            self.clocks[d].poll(self.copiers[d])
        for d in range(self.num_devices):
            self._issue(d, self.caches[d].begin_step(last_tokens))
        self._keep_real = jnp.asarray(np.repeat(real.astype(np.float32)[:, None], self.cfg.top_k, axis=1))
        self.counters.dispatches += 1
        self._step_routes = []

    def end_step(self) -> None:
        for d in range(self.num_devices):
            self._issue(d, self.caches[d].end_step())
        self.routing_log.append(np.stack(self._step_routes, axis=1))

    def experts(self, i: int, j: int, p: dict, h, normed, routing: Routing, real: np.ndarray, scores=None):
        """Layer i (MoE layer j): h [B, T, D] + its MoE output, every device's share resident first."""
        t = time.perf_counter()
        experts = self.counters.to_host("route", routing.experts)  # [N, K] — the one sync per MoE layer
        self.compute_s += time.perf_counter() - t  # waiting for the routing: the device computing until then
        for clock in self.clocks:
            clock.routed(j)
        K = experts.shape[1]
        shares = self.partition.split(np.unique(experts[real]))  # per device: local ids it must hold
        out = {"h": h}

        def compute(p: layer_plan.Pass):  # one expert program over the mesh, every device's share of this pass
            if p.count == 1:
                keep = self._keep_real
            else:
                now = np.concatenate([self.partition.to_global(d, p.chunks[d]) for d in p.active])
                keep = jnp.asarray((np.isin(experts, now) & real[:, None]).astype(np.float32).reshape(-1, K))
                self.counters.dispatches += 1
            table = np.concatenate([c.table.slot_row(j) for c in self.caches])  # i32[E]: slot on the owner
            out["h"] = expert_pass(self.cfg, p.first, params["mlp"], out["h"], normed,
                                   routing, keep, self._pool(j), jnp.asarray(table), kernel=self.kernel)
            self.counters.dispatches += 1
            if self.config.check:
                self._verify()
            if not p.last:
                jax.block_until_ready(out["h"])  # the next pass may evict this pass's experts: finish reading them

        def poll(d, _):
            if self.copiers[d] is not None:
                self.clocks[d].poll(self.copiers[d])

        def wait(d, chunk):
            if self.copiers[d] is not None:
                self.clocks[d].wait(j, chunk, self.copiers[d])

        params = p
        layer_plan.run_layer(self.caches, j, shares, issue=self._issue, compute=compute, poll=poll, wait=wait)
        layer_plan.release_all(self.caches, j)
        h = out["h"]
        self._step_routes.append(experts[real])
        return h, routing

    def _pool(self, j: int) -> MeshPool:
        """The device pools seen as one array split over the mesh (no copy: each device's block is its pool; this
        process supplies the blocks of its own devices)."""
        pools = [c.pool for c in self.copiers if c is not None]
        L, S = jax.tree.leaves(pools[0])[0].shape[:2]

        def assemble(*leaves):
            shape = (L, self.num_devices * S) + leaves[0].shape[2:]
            return jax.make_array_from_single_device_arrays(shape, self._pool_sharding, list(leaves))
        return MeshPool(pool=jax.tree.map(assemble, *pools), layer=jnp.int32(j), mesh=self.mesh, axis=EXPERT_AXIS,
                        owner=self.owner)

    def resident_row(self, j: int) -> np.ndarray:
        """bool[E]: experts of MoE layer j resident (arrived or in flight) on the device that owns them."""
        return np.concatenate([np.asarray(c.table.slot_row(j)) >= 0 for c in self.caches])

    def _verify(self) -> None:
        """check=True: every device's cache invariants and slot bytes."""
        for cache, store, copier in zip(self.caches, self.stores, self.copiers):
            cache.verify()
            if copier is not None:
                store.verify(copier.pool, cache.table.expert_of_slot)

    def _device_stats(self, d: int) -> SourceStats:
        c = self.caches[d]
        return cache_stats(c, step="layer", copier="inline", clock="wall",
                           h2d_bytes_real=c.loads * self.bytes_per_expert,  # counted by the cache: any process
                           bytes_per_expert_real=self.bytes_per_expert, h2d_s=0.0,
                           stall_s=self.clocks[d].stall_s,  # 0 for another process's device (its owner measures it)
                           compute_s=0.0, routing=self.config.routing, routing_substitutions=0,
                           slots_per_layer=c.table.slots_per_layer,
                           # the pool every device allocates: S slots per MoE layer (its budget), whatever it uses
                           expert_bytes_resident=self.slots * self.num_moe_layers * self.bytes_per_expert,
                           detail={"device": str(self.devices[d]), "experts": self.partition.sizes[d]})

    def stats(self) -> SourceStats:
        per = tuple(self._device_stats(d) for d in range(self.num_devices))
        total = lambda name: sum(vars(p)[name] for p in per)  # noqa: E731
        return SourceStats(policy=self.caches[0].policy.name, step="layer", hits=total("hits"),
                           misses=total("misses"), cache_loads=total("cache_loads"),
                           cache_demand_loads=total("cache_demand_loads"),
                           cache_prefetch_issued=total("cache_prefetch_issued"),
                           cache_prefetch_used=total("cache_prefetch_used"), h2d_bytes=total("h2d_bytes"),
                           bytes_per_expert=self.bytes_per_expert, h2d_bytes_real=total("h2d_bytes_real"),
                           bytes_per_expert_real=self.bytes_per_expert, h2d_s=0.0, stall_s=total("stall_s"),
                           compute_s=self.compute_s, copier="inline (per device)", clock="wall",
                           routing=self.config.routing, routing_substitutions=0, slots_per_layer=self.slots,
                           expert_bytes_resident=max(p.expert_bytes_resident for p in per),
                           devices=self.num_devices, per_device=per,
                           detail={"experts_per_device": list(self.partition.sizes)})

    def close(self) -> None:
        for copier in self.copiers:
            if copier is not None:
                copier.close()
