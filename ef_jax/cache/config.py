"""OffloadConfig: how much device memory routed experts may use, and which policy manages it."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from ef_jax.cache.auto_budget import is_auto

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """4GiB, 512MiB, 1.5GB, 1000000 → bytes."""
    if isinstance(value, bool):
        raise TypeError("expert_memory must be bytes (int) or a size string like '4GiB', not a bool")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expert_memory={value!r} is not a size: use bytes or e.g. '4GiB', '512MiB', '1.5GB' "
                         "(or 'auto' in OffloadConfig: the device's free memory)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


ROUTING_MODES = ("exact", "cache-aware")
# Router-probability difference below which cache-aware routing prefers a resident expert. Chosen from the δ
# sweep in docs/expertflow.md (perplexity cost ≤ 1 % on held-out text).
DEFAULT_ROUTING_TOLERANCE = 0.02
TRANSFER_MODES = ("inline", "thread", "program")
DEFAULT_TRANSFERS = "program"
STEP_MODES = ("layer", "device")
HOST_MEMORY_MODES = ("pinned", "mapped")


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """Experts live in pinned host memory; each MoE layer gets `slots_per_layer` device slots.

    Give the budget as `expert_memory` (bytes or "4GiB", split evenly over MoE layers; or "auto": what the device
    has free after the non-expert weights, the run's KV cache and a margin, see ef_jax.cache.auto_budget — the
    choice and its reason are in stats["budget_auto"]) or directly as `slots_per_layer` — exactly one of them.
      policy: a policy name ("nocache", "lru", "lfu", ...) or a Policy object.
      layers_per_group: consecutive dense layers run in one jitted call (MoE layers always sync on routing);
        default 4 (ef_jax.engine.forward.forward.DEFAULT_LAYERS_PER_GROUP), step="layer" only.
      record_timeline: a path: write a Chrome/Perfetto trace JSON of compute, transfers and stalls there.
        Timing a transfer or a layer means waiting for it, so a recorded run overlaps less than a plain one.
        With step="device": one event per step holding its device counters (misses, prefetches, horizon, bytes)
        and counter graphs of them, read with the sampled token (no extra sync); one device.
      check: verify cache invariants and slot contents after every layer (slow; for tests).
      timing: None (wall clock) or a timing preset name ("h100") / ef_jax.cache.timing.Timing: transfers and
        compute are then charged on the simulator's deterministic virtual clock (real bytes still move, so tokens
        are unchanged; stall_s and the policy's measurements become virtual).
      routing: "exact" (default: the model's own routing) or "cache-aware" (opt-in, changes outputs): where a
        resident expert's router probability is within `routing_tolerance` of a chosen non-resident one, the
        resident one is used instead, its weight renormalised as the family does.
      routing_tolerance: δ ≥ 0 for cache-aware routing (default DEFAULT_ROUTING_TOLERANCE).
      transfers: None = "program" (default, step="layer" only: copies travel inside the next MoE layer's compiled program and overlap its
        compute; the host never waits for them, so wall-clock stall_s reads 0 and the wait is inside the
        programs), "inline" (device_put + a slot-write program per copy, from the thread that dispatches
        compute) or "thread" (a background copy thread; see ef_jax.engine.transfer.copier.ThreadCopier for the H100
        measurement behind it). Either clock.
      step: "layer" (default: the host routes each MoE layer, one sync per layer) or "device" (the whole token
        step, every layer, in one jitted program with the expert cache on the device; see
        ef_jax.engine.programs.device_step: every device policy decides inside the program; `transfers`,
        `layers_per_group` and `timing` belong to the layer mode). What a combination cannot do is refused here or
        by the Forward, from ef_jax.cache.support.
      host_memory: "pinned" (default: every expert pinned in host memory once, at the first offloaded run — refused
        with a one-line ValueError naming "mapped" when it would not fit the host's available memory) or "mapped"
        (nothing pinned: each copy reads its expert from the checkpoint files through the page cache, pageable and
        slower, so a model whose experts exceed free RAM still runs; layer mode, one device).
      host_compute: "never" (default: every miss is copied into a slot), "always" (every miss is computed on the
        host from its pinned weights: no copy, no eviction) or "auto" (per miss, whichever ends the layer sooner
        by the cost model of ef_jax.cache.host_compute; hosted experts are also copied in behind the layer while
        the copy stream idles). Layer mode only. Counted in stats (host_computed, host_s, bytes_not_moved).
    How the experts are multiplied is not here: it is the model's (ef_jax.load(expert_kernel=...)), the same for
    a resident and an offloaded run of it.
    """
    expert_memory: int | str | None = None
    slots_per_layer: int | None = None
    policy: Any = "lru"
    layers_per_group: int | None = None
    record_timeline: str | None = None
    check: bool = False
    timing: Any = None
    routing: str = "exact"
    routing_tolerance: float | None = None
    transfers: str | None = None
    step: str = "layer"
    host_memory: str = "pinned"
    host_compute: str = "never"

    def __post_init__(self):
        from ef_jax.cache.host_compute import HOST_COMPUTE_MODES
        if self.host_memory not in HOST_MEMORY_MODES:
            raise ValueError(f"host_memory={self.host_memory!r} must be one of {HOST_MEMORY_MODES}")
        if self.host_compute not in HOST_COMPUTE_MODES:
            raise ValueError(f"host_compute={self.host_compute!r} must be one of {HOST_COMPUTE_MODES}")
        if self.step not in STEP_MODES:
            raise ValueError(f"step={self.step!r} must be one of {STEP_MODES}")
        if self.transfers is not None and self.transfers not in TRANSFER_MODES:
            raise ValueError(f"transfers={self.transfers!r} must be one of {TRANSFER_MODES}")
        if (self.expert_memory is None) == (self.slots_per_layer is None):
            raise ValueError("give exactly one of expert_memory (e.g. '4GiB') or slots_per_layer (e.g. 8)")
        if self.expert_memory is not None and not self.auto:
            b = parse_bytes(self.expert_memory)
            if b <= 0:
                raise ValueError(f"expert_memory={self.expert_memory!r} must be positive")
        if self.slots_per_layer is not None and (not isinstance(self.slots_per_layer, int) or self.slots_per_layer < 1):
            raise ValueError(f"slots_per_layer={self.slots_per_layer!r} must be a positive int")
        if self.layers_per_group is not None and (not isinstance(self.layers_per_group, int)
                                                  or self.layers_per_group < 1):
            raise ValueError(f"layers_per_group={self.layers_per_group!r} must be a positive int")
        if self.timing is not None:
            from ef_jax.cache.timing import get_timing
            try:
                get_timing(self.timing)
            except ValueError as e:
                raise ValueError(f"timing={self.timing!r}: {e}") from None
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing={self.routing!r} must be one of {ROUTING_MODES}")
        tol = self.routing_tolerance
        if tol is not None:
            if self.routing != "cache-aware":
                raise ValueError(f"routing_tolerance={tol!r} only applies with routing='cache-aware' "
                                 f"(got routing={self.routing!r})")
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
                raise ValueError(f"routing_tolerance={tol!r} must be a number in [0, 1] (a router-probability "
                                 f"difference), e.g. {DEFAULT_ROUTING_TOLERANCE}")
        from ef_jax.cache import support  # the rows a config alone decides (the Forward checks the rest)
        support.check(support.Request.of(self))

    @property
    def copies(self) -> str:
        """The layer mode's copier (transfers, default "program")."""
        return self.transfers or DEFAULT_TRANSFERS

    @property
    def auto(self) -> bool:
        """expert_memory="auto": the engine picks the budget from the device's free memory."""
        return is_auto(self.expert_memory)

    @property
    def tolerance(self) -> float:
        """δ in effect for cache-aware routing."""
        return DEFAULT_ROUTING_TOLERANCE if self.routing_tolerance is None else float(self.routing_tolerance)

    def resolve_slots(self, num_moe_layers: int, num_experts: int, top_k: int, bytes_per_expert: int) -> int:
        """Slots per layer for a model; raises ValueError when the budget cannot hold one token's top-k."""
        if self.slots_per_layer is not None:
            slots = self.slots_per_layer
        elif self.auto:
            raise ValueError("expert_memory='auto' has no size until the engine reads the device's free memory "
                             "(ef_jax.engine.transfer.device_memory.resolve_auto); resolve_slots needs bytes or slots")
        else:
            slots = parse_bytes(self.expert_memory) // (bytes_per_expert * num_moe_layers)
        if slots < top_k:
            need = top_k * bytes_per_expert * num_moe_layers
            raise ValueError(
                f"expert budget too small: {slots} slot{'' if slots == 1 else 's'} per layer, but one token needs its "
                f"top-{top_k} experts "
                f"resident; the minimum is {top_k} slots per layer = {need:,} bytes ({need / 2**20:.1f} MiB) over "
                f"{num_moe_layers} MoE layers of {bytes_per_expert:,}-byte experts")
        return min(slots, num_experts)
