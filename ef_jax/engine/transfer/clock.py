"""Clocks: decide when a copy counts as arrived, how long compute waited for it (stall), and what a layer cost.

wall:    arrivals are the copier's finished copies; stall = real time blocked in wait(); layer compute measured
         (an interval in which JAX compiled something is not reported: compile time is not compute or copy time)
virtual: the simulator's timing model (ef_jax.cache.timing): one FIFO copy stream ⟂ a compute clock that charges
         `layer_compute_s` per MoE layer; the copier still moves the real bytes, so tokens are unchanged

Either clock reports measurements (copy time, per-layer compute time) to the cache for adaptive policies
(`ExpertCache.measure`). Any copier runs under either clock (ef_jax.engine.transfer.copier).
"""
from __future__ import annotations

import time

import numpy as np

from ef_jax.cache.expert_cache import ExpertCache, Load
from ef_jax.cache.host_compute import HostStream, LayerCosts
from ef_jax.cache.timing import CopyStream, Timing, layer_costs
from ef_jax.engine.telemetry.compile_time import compile_seconds
from ef_jax.engine.telemetry.timeline import Timeline


class WallClock:
    name = "wall"

    def __init__(self, cache: ExpertCache, timeline: Timeline | None = None):
        self.cache, self.timeline = cache, timeline
        # (layer, expert) → (perf_counter, compile_seconds()) at issue
        self._issued_at: dict[tuple[int, int], tuple[float, float]] = {}
        self._last_arrival = (0.0, 0.0)  # the same when the previous copy was seen finished (FIFO estimate)
        self._ready_at: tuple[float, float] | None = None  # the same when the last layer's experts were all in
        self.stall_s = 0.0  # time the compute waited for copies
        self.unmeasured = 0  # intervals not reported to the policy because JAX compiled something in them

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), compile_seconds()

    def _report(self, name: str, start: tuple[float, float], end: tuple[float, float]) -> None:
        """cache.measure(name=end − start), unless a compile ran in between (first calls of new shapes)."""
        if end[1] > start[1]:
            self.unmeasured += 1
            return
        self.cache.measure(**{name: end[0] - start[0]})

    def issued(self, loads: list[Load]) -> None:
        now = self._now()
        for ld in loads:
            self._issued_at[(ld.layer, ld.expert)] = now

    def _arrived(self, key: tuple[int, int]) -> None:
        # A copy is seen finished only at a poll or wait, so its duration is estimated as FIFO service time:
        # from max(its issue, the previous arrival) to now. Late detection inflates it; adaptive policies correct
        # for the bias through their own feedback.
        now = self._now()
        start = max(self._issued_at.pop(key, now), self._last_arrival)
        self._last_arrival = now
        self.cache.arrive(*key)
        self._report("copy_s", start, now)

    def poll(self, copier) -> None:
        for key in copier.poll():
            self._arrived(key)

    def wait(self, layer: int, experts: np.ndarray, copier) -> None:
        """Blocks until `experts` of `layer` are in its pool (demand loads and late prefetches)."""
        t = time.perf_counter()
        waited = copier.wait(layer, experts, block=True)
        for key in waited:
            self._arrived(key)
        if waited:
            self.stall_s += time.perf_counter() - t
            if self.timeline is not None:
                self.timeline.add(f"stall L{layer}", "compute", t)
        self._ready_at = self._now()

    def routed(self, layer: int) -> None:
        """The routing of `layer` reached the host: the time since the previous layer's experts were ready is
        one layer of compute on the critical path (its experts, this layer's attention and router)."""
        if self._ready_at is not None:
            self._report("layer_compute_s", self._ready_at, self._now())

    def computed(self, layer: int, passes: int) -> None:
        """`layer`'s expert compute is dispatched (the wall clock needs no bookkeeping here)."""

    def costs(self, layer: int, resident) -> None:
        """No modelled clock state: the caller falls back to its calibrated costs."""
        return None

    def hosted(self, seconds: float) -> None:
        """The layer just routed has `seconds` of host compute (the wall clock sees it as the device's wait)."""

    def joined(self) -> None:
        """The layer's host share joins its sum (the wall clock needs no bookkeeping here)."""

    def stats(self) -> dict:
        return {"clock": self.name, "timings_skipped_for_compiles": self.unmeasured}


class VirtualClock:
    """Arrivals, stalls and compute on a deterministic virtual clock, exactly as ef_jax.sim.replay: the routing of
    a layer is known at `now` (the end of the previous layer); copies finished by then are hits; the layer waits
    for its experts (stall), then computes for `timing.layer_compute_s` (split evenly over the passes of a
    multi-pass layer). Dense layers are folded into the MoE layers' compute time."""
    name = "virtual"

    def __init__(self, cache: ExpertCache, timing: Timing, num_layers: int, num_experts: int):
        self.cache, self.timing = cache, timing
        self.now = 0.0  # the virtual compute clock, seconds
        self.stream = CopyStream(cache, num_layers, num_experts, timing)
        self.host = HostStream(timing.host)
        self._host_done: float | None = None  # when the routed layer's host share is done
        self.stall_s = 0.0

    def issued(self, loads: list[Load]) -> None:
        self.stream.issue(loads, self.now)

    def poll(self, copier) -> None:
        copier.poll()  # the copier's own bookkeeping; arrivals follow the stream
        self.stream.advance(self.now)

    def wait(self, layer: int, experts: np.ndarray, copier) -> None:
        copier.wait(layer, experts, block=False)  # the bytes must be in the pool; their timing is virtual
        start = self.stream.ready_at(layer, experts.tolist(), self.now)
        self.stall_s += start - self.now
        self.now = start
        self.stream.advance(self.now)

    def routed(self, layer: int) -> None:
        pass

    def computed(self, layer: int, passes: int) -> None:
        self.now += self.timing.layer_compute_s / passes
        self.cache.measure(layer_compute_s=self.timing.layer_compute_s)

    def costs(self, layer: int, resident) -> LayerCosts:
        """The clocks' state at this layer's routing (ef_jax.cache.host_compute.decide_layer)."""
        return layer_costs(self.stream, self.host, self.timing, layer, resident, self.now)

    def hosted(self, seconds: float) -> None:
        """The host starts the routed layer's host share now (before the layer waits for its copies)."""
        self._host_done = self.host.run(self.now, seconds)

    def joined(self) -> None:
        """The layer ends when its host share is done too, as in ef_jax.sim.replay."""
        if self._host_done is not None and self._host_done > self.now:
            self.stall_s += self._host_done - self.now
            self.now = self._host_done
        self._host_done = None

    def stats(self) -> dict:
        return {"clock": self.name, "virtual_total_s": self.now, "copy_busy_s": self.stream.busy_s,
                "host_s": self.host.busy_s}
