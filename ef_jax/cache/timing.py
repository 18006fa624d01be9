"""The timing model shared by the trace simulator and the engine's virtual clock: one copy stream ⟂ compute.

Loads → CopyStream (FIFO, expert_bytes / h2d_bytes_per_s each) → arrival times → cache.arrive when the clock
passes them;  compute: each MoE layer charges layer_compute_s after its experts have arrived (stall = the wait).

Axes: L MoE layers, E experts per layer.

`Timing` fixes bytes per expert, bandwidth and per-layer compute independently of the model being run, so a small
model's real routing and hidden states can stand in for a large model's (the engine runs with `timing=` set on
OffloadConfig: real data moves, but arrivals and stalls follow this deterministic clock).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

from ef_jax.cache.host_compute import HostStream, HostTiming, LayerCosts, host_presets


@dataclasses.dataclass(frozen=True)
class Timing:
    """Copy-stream and compute-clock parameters."""
    h2d_bytes_per_s: float   # effective pinned host→device bandwidth (math.inf: copies are free)
    expert_bytes: int        # bytes of one routed expert (gate + up + down)
    layer_compute_s: float   # one MoE layer's decode compute (attention + router + experts), seconds
    host: HostTiming | None = None  # the host FFN's speed for this expert (host-computed experts); None: none

    def __post_init__(self):
        if not self.h2d_bytes_per_s > 0:
            raise ValueError(f"h2d_bytes_per_s={self.h2d_bytes_per_s} must be > 0 (math.inf for free copies)")
        if self.expert_bytes < 0 or self.layer_compute_s < 0:
            raise ValueError(f"expert_bytes={self.expert_bytes} and layer_compute_s={self.layer_compute_s} "
                             f"must be ≥ 0")

    @property
    def copy_s(self) -> float:
        """Seconds one expert copy occupies the copy stream."""
        return self.expert_bytes / self.h2d_bytes_per_s


# DeepSeek-V2-Lite routed expert: gate, up, down, each 2048 × 1408, bf16 → 17,301,504 bytes.
DEEPSEEK_V2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2

TIMING_PRESETS: dict[str, Timing] = {
    # ASSUMPTIONS, not measurements (no GPU was available when this was written): ~50 GB/s effective pinned H2D
    # over PCIe Gen5 x16 (64 GB/s raw), and 0.25 ms per MoE layer of batch-1 decode compute on an H100. Replace
    # both with numbers measured by the engine's benchmark.
    "h100": Timing(h2d_bytes_per_s=50e9, expert_bytes=DEEPSEEK_V2_LITE_EXPERT_BYTES, layer_compute_s=0.25e-3),
    # MEASURED on the lent H100 (jax 0.11.2; benchmarks/results/transfer_NVIDIA_H100_80GB_HBM3.md and
    # offload_NVIDIA_H100_80GB_HBM3.md): 16 back-to-back 17.3 MB expert copies from pinned host in 5.58 ms
    # (49.6 GB/s); all-resident decode of a 4-MoE-layer DeepSeek-V2-Lite-shaped model at 291 tokens/s, i.e.
    # 0.86 ms per layer as this engine runs it today (jitted layer groups plus Python dispatch).
    "h100-measured": Timing(h2d_bytes_per_s=49.6e9, expert_bytes=DEEPSEEK_V2_LITE_EXPERT_BYTES,
                            layer_compute_s=0.86e-3),
}


_HOST = host_presets()
# PCIe 4.0 x16: 32 GB/s raw, ~25 GB/s effective pinned host→device — ASSUMED, the figure the consumer cards'
# offloading reports quote (a desktop GPU on PCIe 4.0); the per-layer compute kept at the h100 preset's 0.25 ms
# (batch-1 decode of one DeepSeek-V2-Lite layer is launch/latency-bound on either card) — also an assumption.
CONSUMER_H2D = 25e9
if _HOST:
    for _name in ("h100", "h100-measured"):  # the H100 machine's 16 host cores (derived, see host_presets)
        TIMING_PRESETS[_name] = dataclasses.replace(TIMING_PRESETS[_name], host=_HOST["cores16"])
    TIMING_PRESETS.update({
        # a consumer desktop: PCIe 4.0 and 8 host cores (derived)
        "consumer": Timing(h2d_bytes_per_s=CONSUMER_H2D, expert_bytes=DEEPSEEK_V2_LITE_EXPERT_BYTES,
                           layer_compute_s=0.25e-3, host=_HOST["cores8"]),
        # PCIe 4.0 beside the host FFN exactly as measured on the 2-core CPU machine
        "consumer-cpu2": Timing(h2d_bytes_per_s=CONSUMER_H2D, expert_bytes=DEEPSEEK_V2_LITE_EXPERT_BYTES,
                                layer_compute_s=0.25e-3, host=_HOST["cpu2-measured"]),
        # the host FFN as fast as the copy (25 GB/s each, the measured growth with tokens): the case where
        # splitting a layer's misses between the two can halve its stall (an analysis preset, not a machine)
        "equal-rates": Timing(h2d_bytes_per_s=CONSUMER_H2D, expert_bytes=DEEPSEEK_V2_LITE_EXPERT_BYTES,
                              layer_compute_s=0.25e-3,
                              host=HostTiming(CONSUMER_H2D, _HOST["cpu2-measured"].token_cost,
                                              "assumed: equal to the copy rate")),
    })


def layer_costs(stream: "CopyStream", host: HostStream, timing: Timing | None, layer: int,
                resident: Iterable[int], now: float) -> LayerCosts | None:
    """The clocks' state when `layer` is routed at `now`, for ef_jax.cache.host_compute.decide_layer:
    resident: the needed experts already in a slot (arrived or in flight)."""
    if timing is None:
        return None
    ready = max([now] + [stream.arrival[layer][e] for e in resident]) - now
    return LayerCosts(device_ready=ready, copy_free=max(stream.free_at - now, 0.0),
                      host_free=max(host.free_at - now, 0.0), copy_s=timing.copy_s,
                      compute_s=timing.layer_compute_s, expert_bytes=timing.expert_bytes, host=timing.host)


def get_timing(timing: "str | Timing | None") -> Timing | None:
    if timing is None or isinstance(timing, Timing):
        return timing
    if timing not in TIMING_PRESETS:
        raise ValueError(f"unknown timing preset {timing!r}; valid: {', '.join(sorted(TIMING_PRESETS))}")
    return TIMING_PRESETS[timing]


class CopyStream:
    """One FIFO copy stream: arrival times are increasing in issue order, so pending copies form a queue.

    `cache` is anything with arrive(layer, expert) and measure(copy_s=) (an ExpertCache); `timing=None` makes every copy arrive at once.
    """

    def __init__(self, cache, num_layers: int, num_experts: int, timing: Timing | None):
        self.cache, self.timing = cache, timing
        self.free_at = 0.0                              # when the stream finishes its last queued copy
        self.pending = collections.deque()              # (arrival_s, layer, expert, seq), arrival ascending
        L, E = num_layers, num_experts
        self.arrival = [[0.0] * E for _ in range(L)]    # f[L][E]: arrival of the latest copy of (l, e)
        self.seq = [[0] * E for _ in range(L)]          # i[L][E]: id of that latest copy
        self.busy_s = 0.0                               # total time the stream spent copying
        self._n = 0

    def issue(self, loads: Iterable, now: float) -> None:
        if self.timing is None:  # no clock: every copy is done at once
            for ld in loads:
                self.cache.arrive(ld.layer, ld.expert)
            return
        copy_s = self.timing.copy_s
        for ld in loads:
            self.free_at = max(self.free_at, now) + copy_s
            self.busy_s += copy_s
            self._n += 1
            self.arrival[ld.layer][ld.expert] = self.free_at
            self.seq[ld.layer][ld.expert] = self._n
            self.pending.append((self.free_at, ld.layer, ld.expert, self._n))

    def advance(self, now: float) -> None:
        """Report to the cache every copy finished by `now` (skipping copies superseded by a later reload)."""
        while self.pending and self.pending[0][0] <= now:
            _, l, e, n = self.pending.popleft()
            if self.seq[l][e] == n:
                self.cache.arrive(l, e)
            self.cache.measure(copy_s=self.timing.copy_s)  # adaptive policies learn the bandwidth from arrivals

    def ready_at(self, layer: int, experts: Iterable[int], now: float) -> float:
        """When every expert of `experts` at `layer` is in (≥ now)."""
        return max([now] + [self.arrival[layer][e] for e in experts])
