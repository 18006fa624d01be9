"""TransferQueue: performs the ExpertCache's Loads on the device and tracks them until they arrive.

Load → store.fetch (device_put from pinned host; async) → write_slot (in-place, donated pool) → in flight
     → poll(): finished copies are reported to the cache (cache.arrive) → wait(layer): block on what a layer needs

The seam for other transfer strategies (a copy thread, a jitted fetch-and-write, multi-GPU placement): the engine
only calls issue / poll / wait / routed / computed and reads `pools`.

Clocks: `TransferQueue` runs on the wall clock; `VirtualTransferQueue` moves the same bytes but decides arrivals and
stalls on the deterministic timing model of ef_jax.offload.clock (the simulator's), so a CPU run can stand in for
a GPU's copy stream. Both report measurements (copy time, per-layer compute time) to the cache for adaptive
policies (`ExpertCache.measure`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.offload.cache import ExpertCache, Load
from ef_jax.offload.clock import CopyStream, Timing
from ef_jax.offload.store import ExpertStore, write_slot
from ef_jax.offload.timeline import Timeline


class TransferQueue:
    clock = "wall"

    def __init__(self, store: ExpertStore, slots: int, cache: ExpertCache, timeline: Timeline | None = None):
        self.store, self.cache, self.timeline = store, cache, timeline
        self.pools = store.empty_pools(slots)                  # per MoE layer: ExpertPool of S slots
        self._inflight: dict[tuple[int, int], jax.Array] = {}  # (layer, expert) → device buffer being copied
        self._issued_at: dict[tuple[int, int], float] = {}     # (layer, expert) → perf_counter at issue
        self._last_arrival = 0.0  # when the previous copy was seen finished (FIFO copy-time estimate)
        self._ready_at: float | None = None  # when the last layer's experts were all in (compute-time estimate)
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
            self._issued_at[(ld.layer, ld.expert)] = t
            self.bytes += self.store.bytes_per_expert
            self.issue_s += time.perf_counter() - t
            if self.timeline is not None:  # timing a copy means waiting for it: recorded runs overlap less
                buf.block_until_ready()
                self.timeline.add(f"H2D L{ld.layer} e{ld.expert} ({ld.kind})", "copy", t)

    def _arrived(self, key: tuple[int, int]) -> None:
        # A copy is seen finished only at a poll or wait, so its duration is estimated as FIFO service time:
        # from max(its issue, the previous arrival) to now. Late detection inflates it; adaptive policies correct
        # for the bias through their own feedback.
        now = time.perf_counter()
        start = max(self._issued_at.pop(key, now), self._last_arrival)
        self._last_arrival = now
        self.cache.arrive(*key)
        self.cache.measure(copy_s=now - start)

    def poll(self) -> None:
        """Reports copies that have finished to the cache (they become hits)."""
        for key, buf in list(self._inflight.items()):
            if buf.is_ready():
                del self._inflight[key]
                self._arrived(key)

    def wait(self, layer: int, experts: np.ndarray) -> None:
        """Blocks until every expert of `layer` in `experts` has arrived (demand loads and late prefetches)."""
        t = time.perf_counter()
        waited = False
        for e in experts.tolist():
            buf = self._inflight.pop((layer, e), None)
            if buf is not None:
                buf.block_until_ready()
                self._arrived((layer, e))
                waited = True
        if waited:
            jax.block_until_ready(self.pools[layer])
            self.stall_s += time.perf_counter() - t
            if self.timeline is not None:
                self.timeline.add(f"stall L{layer}", "compute", t)
        self._ready_at = time.perf_counter()

    def routed(self, layer: int) -> None:
        """The routing of `layer` reached the host: the time since the previous layer's experts were ready is
        one layer of compute on the critical path (its experts, this layer's attention and router)."""
        if self._ready_at is not None:
            self.cache.measure(layer_compute_s=time.perf_counter() - self._ready_at)

    def computed(self, layer: int, passes: int) -> None:
        """`layer`'s expert compute is dispatched (the wall clock needs no bookkeeping here)."""

    def stats(self) -> dict:
        return {"clock": self.clock}


class VirtualTransferQueue(TransferQueue):
    """Real copies (tokens stay exact) with arrivals, stalls and compute charged on a virtual clock.

    Per MoE layer, exactly as ef_jax.sim.replay: the routing is known at `now` (the end of the previous layer);
    copies finished by then are hits; the layer waits for its experts (stall), then computes for
    `timing.layer_compute_s` (split evenly over the passes of a multi-pass layer). Dense layers are folded into
    the MoE layers' compute time. Hidden-state prefetches are issued when the layer that produced them ends.
    """
    clock = "virtual"

    def __init__(self, store: ExpertStore, slots: int, cache: ExpertCache, timing: Timing,
                 timeline: Timeline | None = None):
        super().__init__(store, slots, cache, timeline)
        self.timing = timing
        self.now = 0.0  # the virtual compute clock, seconds
        self.stream = CopyStream(cache, store.num_layers, store.num_experts, timing)

    def issue(self, loads: list[Load]) -> None:
        for ld in loads:  # data moves for real (JAX orders the slot write before the compute that reads it)
            t = time.perf_counter()
            buf = self.store.fetch(ld.layer, ld.expert)
            self.pools[ld.layer] = write_slot(self.pools[ld.layer], buf, jnp.int32(ld.slot))
            self.bytes += self.timing.expert_bytes  # the preset's expert, which this one stands for
            self.issue_s += time.perf_counter() - t
        self.stream.issue(loads, self.now)

    def poll(self) -> None:
        self.stream.advance(self.now)

    def wait(self, layer: int, experts: np.ndarray) -> None:
        start = self.stream.ready_at(layer, experts.tolist(), self.now)
        self.stall_s += start - self.now
        self.now = start
        self.stream.advance(self.now)

    def routed(self, layer: int) -> None:
        pass

    def computed(self, layer: int, passes: int) -> None:
        dt = self.timing.layer_compute_s / passes
        self.now += dt
        self.cache.measure(layer_compute_s=self.timing.layer_compute_s)

    def stats(self) -> dict:
        return {"clock": self.clock, "virtual_total_s": self.now, "copy_busy_s": self.stream.busy_s}


class ThreadedTransferQueue(TransferQueue):
    """Copies issued from one background copy thread; slot writes applied on the main thread in issue order.

    Why: on an H100 with jax 0.11, a `device_put` issued from the thread that has just dispatched compute overlapped
    only ~12 % of its copy time with that compute, while the same copies issued from a separate thread overlapped
    ~55 % (benchmarks/results/transfer_NVIDIA_H100_80GB_HBM3.md). The thread only moves bytes host → device; the
    donated slot write stays on the main thread, so the pool pytree is never touched concurrently. A layer's
    pending writes are applied (in FIFO order) up to the last one it needs before its experts run; later ones
    wait for a poll or for their own layer. check=True applies every pending write (all layers) at each wait, so
    slot-content verification sees what the slot table says.

    Measured end to end on the same H100 (benchmarks/results/offload_transfers_*_NVIDIA_H100_80GB_HBM3.md), with
    demand-loading policies (nocache, lru) this mode is slower than inline copies (DeepSeek-V2-Lite shapes, lru,
    50 %: 48.6 vs 60.0 tokens/s): a demand load cannot overlap anything, and the hand-off to the thread adds
    latency. So "inline" stays the default; whether prefetching policies gain from the thread is not yet measured.
    """
    clock = "wall-thread"

    def __init__(self, store: ExpertStore, slots: int, cache: ExpertCache, timeline: Timeline | None = None,
                 check: bool = False):
        super().__init__(store, slots, cache, timeline)
        import concurrent.futures
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ef-jax-h2d")
        self._pending: dict[int, list] = {}  # layer → FIFO of (slot, (layer, expert), future of the device buffer)
        self._check = check

    def _copy(self, layer: int, expert: int) -> jax.Array:
        buf = self.store.fetch(layer, expert)
        buf.block_until_ready()  # the future completes when the bytes are on the device
        return buf

    def issue(self, loads: list[Load]) -> None:
        for ld in loads:
            t = time.perf_counter()
            key = (ld.layer, ld.expert)
            self._pending.setdefault(ld.layer, []).append((ld.slot, key, self._copier.submit(self._copy, *key)))
            self._issued_at[key] = t
            self.bytes += self.store.bytes_per_expert
            self.issue_s += time.perf_counter() - t

    def _apply(self, layer: int, count: int) -> None:
        """Writes the first `count` pending copies of `layer` into its pool (blocking on each copy)."""
        q = self._pending.get(layer, [])
        for _ in range(min(count, len(q))):
            slot, key, fut = q.pop(0)
            buf = fut.result()
            self.pools[layer] = write_slot(self.pools[layer], buf, jnp.int32(slot))
            if self.timeline is not None:
                self.timeline.add(f"H2D L{key[0]} e{key[1]}", "copy", self._issued_at.get(key, time.perf_counter()))
            self._arrived(key)

    def poll(self) -> None:
        for layer, q in self._pending.items():
            done = 0
            while done < len(q) and q[done][2].done():
                done += 1
            self._apply(layer, done)

    def wait(self, layer: int, experts: np.ndarray) -> None:
        t = time.perf_counter()
        q = self._pending.get(layer, [])
        wanted = set((layer, e) for e in experts.tolist())
        last = max((n for n, (_, key, _) in enumerate(q) if key in wanted), default=-1)
        if last >= 0:
            self._apply(layer, last + 1)
        if self._check:
            for other, rest in self._pending.items():
                self._apply(other, len(rest))
        if last >= 0:
            jax.block_until_ready(self.pools[layer])
            self.stall_s += time.perf_counter() - t
            if self.timeline is not None:
                self.timeline.add(f"stall L{layer}", "compute", t)
        self._ready_at = time.perf_counter()
