"""The expert-source contract: what the Forward, the decode loop, the server and eval-policy use of a source.

Forward → source.capabilities (read once) → begin_step → [step | fused groups over pools/slot_maps |
  per MoE layer: experts or experts_then_attend] → end_step;  callers → stats() → SourceStats, routing_log,
  resident_row, set_route_override

Every source (resident, offloaded layer mode, device step, mesh resident, mesh offloaded) implements
`ExpertSource` and declares what it does in a frozen `Capabilities`; callers read those flags and never probe a
source with isinstance/hasattr. What a combination of options cannot do is refused before any work by
ef_jax.support (one table), so a source never silently ignores an option.

`SourceStats` has one key set for every source (totals; per device on a mesh), so a caller reads e.g.
`cache_prefetch_issued` whatever ran. Source-specific figures (the layer mode's program variants, the device
step's readbacks) travel in `detail` and are flattened into `as_dict()` beside the common keys.

Axes: B rows, T new tokens, N tokens (B·T), K top-k, E experts, L MoE layers, D model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol, runtime_checkable

import numpy as np

# route_override(step, moe_layer j, experts i32[N, K]) → i32[N, K]: replaces the router's choice (benchmarks:
# a random-weight model of a real shape replays real routing)
RouteOverride = Callable[[int, int, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a source does; the Forward and every caller branch on these, nothing else.

      offloaded:        experts stream from host memory into a bounded cache (hits/misses are meaningful, the
                        routing log is kept, resident_row answers)
      fused:            routing and experts may run in one program (the fused layer groups over `pools`)
      whole_step:       `step()` runs every layer of an untapped step in one program
      chains_attention: `experts_then_attend` runs the next MoE layer's attend_route at the end of the expert
                        program (one dispatch per MoE layer)
      route_override:   `set_route_override` is honoured (the host sees each layer's routing before its experts)
      host_compute:     some experts are computed on the host (none yet)
      mesh:             the experts are split over the devices of a mesh (stats()["per_device"])
    """
    offloaded: bool
    fused: bool
    whole_step: bool = False
    chains_attention: bool = False
    route_override: bool = False
    host_compute: bool = False
    mesh: bool = False


@dataclasses.dataclass(frozen=True)
class SourceStats:
    """One key set for every source. Counts are per expert access (one needed expert, one layer, one step);
    bytes as the clock counts them (`*_real`: what actually moved). A resident source reports zeros."""
    policy: str                  # "resident" or the offload policy's name
    step: str                    # "resident" | "layer" | "device"
    hits: int
    misses: int
    cache_loads: int             # copies issued (demand + prefetch)
    cache_demand_loads: int
    cache_prefetch_issued: int
    cache_prefetch_used: int
    h2d_bytes: int
    bytes_per_expert: int
    h2d_bytes_real: int
    bytes_per_expert_real: int
    h2d_s: float                 # host time spent issuing copies
    stall_s: float               # compute waiting for copies (virtual seconds under a virtual clock)
    compute_s: float
    copier: str
    clock: str
    routing: str                 # "exact" | "cache-aware"
    routing_substitutions: int
    slots_per_layer: int
    expert_bytes_resident: int   # the slot pool's bytes (per device on a mesh)
    devices: int = 1
    per_device: tuple = ()       # tuple[SourceStats, ...] on a mesh, in mesh order
    detail: dict = dataclasses.field(default_factory=dict)  # source-specific figures (flattened by as_dict)

    @property
    def hit_rate(self) -> float:
        accesses = self.hits + self.misses
        return self.hits / accesses if accesses else math.nan

    def as_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k not in ("per_device", "detail")}
        out["hit_rate"] = self.hit_rate
        if self.per_device:
            out["per_device"] = [d.as_dict() for d in self.per_device]
        assert not self.KEYS & self.detail.keys(), f"detail repeats common keys {self.KEYS & self.detail.keys()}"
        out.update(self.detail)
        return out

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls) if f.name not in ("per_device", "detail")) | {"hit_rate"}

    @classmethod
    def resident(cls, slots_per_layer: int, **detail) -> "SourceStats":
        return cls(policy="resident", step="resident", hits=0, misses=0, cache_loads=0, cache_demand_loads=0,
                   cache_prefetch_issued=0, cache_prefetch_used=0, h2d_bytes=0, bytes_per_expert=0,
                   h2d_bytes_real=0, bytes_per_expert_real=0, h2d_s=0.0, stall_s=0.0, compute_s=0.0, copier="none",
                   clock="none", routing="exact", routing_substitutions=0, slots_per_layer=slots_per_layer,
                   expert_bytes_resident=0, detail=detail)


SourceStats.KEYS = SourceStats.keys()  # every source's stats()["..."] names, per_device and detail aside


@runtime_checkable
class ExpertSource(Protocol):
    """Everything the Forward, the decode loop, the server and eval-policy use of an expert source."""
    capabilities: Capabilities
    scorer: object       # device arrays attend_route applies to h (pre-gate scores for the policy), or None
    pools: tuple         # fused only: per layer the slot pool the layer groups read (None for dense layers)
    slot_maps: tuple     # fused only: per layer i32[E] expert → slot (None for dense layers)

    def begin_step(self, last_tokens: np.ndarray, real: np.ndarray) -> None:
        """last_tokens i32[B]: each row's newest token; real bool[N]: which of the step's tokens are not padding."""

    def step(self, kinds, params, x, caches, positions, write_idx, valid, tokens=None):
        """capabilities.whole_step: every layer in one program (tokens i32[B, T] on the device) → (x [B, T, D], caches, routings per layer)."""

    def experts(self, i: int, j: int, p: dict, h, normed, routing, real: np.ndarray, scores=None):
        """Model layer i (MoE layer j): h + its MoE output → (x [B, T, D], the routing actually used)."""

    def experts_then_attend(self, i: int, j: int, p: dict, h, normed, routing, real: np.ndarray, then,
                            scores=None):
        """capabilities.chains_attention: experts(), then the next MoE layer's attend_route (`then`, a
        programs.layer.NextAttention) → (x, routing used, programs.layer.Attended of the next layer, or None when then is None)."""

    def end_step(self) -> None: ...

    @property
    def routing_log(self) -> list[np.ndarray]:
        """Per step: experts i32[N_real, L, K] of the real tokens (offloaded sources; empty when resident)."""

    def resident_row(self, j: int) -> np.ndarray:
        """bool[E]: experts of MoE layer j resident now (every expert for a resident source)."""

    def set_route_override(self, fn: RouteOverride | None) -> None:
        """capabilities.route_override: replace the router's choice at every layer (ValueError otherwise)."""

    def stats(self) -> SourceStats: ...

    def close(self) -> None: ...


class SourceDefaults:
    """What a source that lacks a capability answers (each raises for what its Capabilities says it cannot do, so
    a caller that skipped the capability check fails loudly, never silently)."""
    capabilities: Capabilities
    scorer = None
    pools: tuple = ()
    slot_maps: tuple = ()

    def step(self, kinds, params, x, caches, positions, write_idx, valid, tokens=None):
        raise RuntimeError(f"{type(self).__name__} has no whole-step program (capabilities.whole_step is False)")

    def experts_then_attend(self, i, j, p, h, normed, routing, real, then, scores=None):
        raise RuntimeError(f"{type(self).__name__} does not chain attention (capabilities.chains_attention is False)")

    def set_route_override(self, fn: RouteOverride | None) -> None:
        if fn is not None:
            raise ValueError(f"{type(self).__name__} cannot override routing (capabilities.route_override is False):"
                             " see ef_jax.support")

    def close(self) -> None:
        pass
