"""The eviction/prefetch policy protocol: events in, decisions out.

[ExpertCache] → on_step_start / on_route / on_hidden / on_step_end → prefetch requests [(layer, expert)]
              → victim(layer, candidates) → the resident expert to evict
              → on_access / on_load (bookkeeping only)

Axes: L MoE layers, E experts per layer, S slots per layer, D model width.

A policy is a small strategy object. It sees the cache only through a read-only `CacheView`, keeps its own
host-side state, and never touches device arrays. The same object runs inside the device engine and the
trace-replay simulator (which never calls `on_hidden`).

Prefetch requests may name any layer: a later layer of the current step, or any layer for the next step
(a request for a layer already routed this step is, by construction, for the next step). Requests for experts
already resident are ignored by the cache.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ef_jax.offload.cache import CacheView

Prefetch = tuple[int, int]  # (layer, expert)


@runtime_checkable
class Policy(Protocol):
    """What ExpertCache calls. Subclass `BasePolicy` to get no-op defaults for the hooks you do not need."""
    name: str
    flush_each_step: bool  # True: the cache invalidates every slot at step start (the "nocache" baseline)
    wants_hidden: bool     # True: the engine should copy hidden states to the host and call cache.hidden()
    hidden_point: str      # where on_hidden sees them: "moe" (a layer's output) or "attention" (its MoE input)

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None: ...
    def on_step_start(self, step: int, token_ids: np.ndarray | None, view: CacheView) -> list[Prefetch]: ...
    def on_route(self, layer: int, experts: Sequence[int], view: CacheView) -> list[Prefetch]: ...
    def on_hidden(self, layer: int, hidden: np.ndarray, view: CacheView) -> list[Prefetch]: ...
    def on_step_end(self, step: int, view: CacheView) -> list[Prefetch]: ...
    def on_access(self, layer: int, expert: int, hit: bool) -> None: ...
    def on_load(self, layer: int, expert: int, kind: str) -> None: ...
    def victim(self, layer: int, candidates: Sequence[int], view: CacheView) -> int: ...


class BasePolicy:
    """No-op hooks; `victim` must be overridden.

    Hook order per step (ExpertCache drives it): on_step_start → for each layer in order: [on_access per needed
    expert, on_load per demand load (victim when a slot must be freed)] → on_route → (engine only) on_hidden →
    ... → on_step_end. on_load(kind="prefetch") fires for every prefetch the cache performs.
    """
    name = "base"
    flush_each_step = False
    wants_hidden = False  # hidden states cost a device→host copy per layer: only fetched for policies that ask
    # "moe": after the layer's experts (its output); "attention": the residual after its attention, the MoE's
    # input, seen right after the layer's demand loads are issued and before its experts compute
    hidden_point = "moe"

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        self.num_layers, self.num_experts, self.slots_per_layer = num_layers, num_experts, slots_per_layer

    def on_step_start(self, step: int, token_ids: np.ndarray | None, view: CacheView) -> list[Prefetch]:
        return []

    def on_route(self, layer: int, experts: Sequence[int], view: CacheView) -> list[Prefetch]:
        return []

    def on_hidden(self, layer: int, hidden: np.ndarray, view: CacheView) -> list[Prefetch]:
        return []

    def on_step_end(self, step: int, view: CacheView) -> list[Prefetch]:
        return []

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        pass

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        pass

    def victim(self, layer: int, candidates: Sequence[int], view: CacheView) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement victim()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
