"""TransferQueue: performs the ExpertCache's Loads on the device and tracks them until they arrive.

Load → store.fetch (device_put from pinned host; async) → write_slot (in-place, donated pool) → in flight
     → poll(): finished copies are reported to the cache (cache.arrive) → wait(layer): block on what a layer needs

The seam for other transfer strategies (a copy thread, a jitted fetch-and-write, multi-GPU placement): the engine
only calls issue / poll / wait and reads `pools`.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.offload.cache import ExpertCache, Load
from ef_jax.offload.store import ExpertStore, write_slot
from ef_jax.offload.timeline import Timeline


class TransferQueue:
    def __init__(self, store: ExpertStore, slots: int, cache: ExpertCache, timeline: Timeline | None = None):
        self.store, self.cache, self.timeline = store, cache, timeline
        self.pools = store.empty_pools(slots)                  # per MoE layer: ExpertPool of S slots
        self._inflight: dict[tuple[int, int], jax.Array] = {}  # (layer, expert) → device buffer being copied
        self.bytes = 0        # bytes copied host → device
        self.issue_s = 0.0    # host time spent issuing copies
        self.stall_s = 0.0    # time the compute waited for copies

    def issue(self, loads: list[Load]) -> None:
        """Starts every load's copy and slot write without waiting for it."""
        for ld in loads:
            t = time.perf_counter()
            buf = self.store.fetch(ld.layer, ld.expert)
            self.pools[ld.layer] = write_slot(self.pools[ld.layer], buf, jnp.int32(ld.slot))
            self._inflight[(ld.layer, ld.expert)] = buf
            self.bytes += self.store.bytes_per_expert
            self.issue_s += time.perf_counter() - t
            if self.timeline is not None:  # timing a copy means waiting for it: recorded runs overlap less
                buf.block_until_ready()
                self.timeline.add(f"H2D L{ld.layer} e{ld.expert} ({ld.kind})", "copy", t)

    def poll(self) -> None:
        """Reports copies that have finished to the cache (they become hits)."""
        for key, buf in list(self._inflight.items()):
            if buf.is_ready():
                self.cache.arrive(*key)
                del self._inflight[key]

    def wait(self, layer: int, experts: np.ndarray) -> None:
        """Blocks until every expert of `layer` in `experts` has arrived (demand loads and late prefetches)."""
        t = time.perf_counter()
        waited = False
        for e in experts.tolist():
            buf = self._inflight.pop((layer, e), None)
            if buf is not None:
                buf.block_until_ready()
                self.cache.arrive(layer, e)
                waited = True
        if waited:
            jax.block_until_ready(self.pools[layer])
            self.stall_s += time.perf_counter() - t
            if self.timeline is not None:
                self.timeline.add(f"stall L{layer}", "compute", t)
