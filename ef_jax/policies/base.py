"""The eviction/prefetch policy protocol: events in, decisions out.

[ExpertCache] → on_step_start / on_route / on_hidden / on_step_end → prefetch requests [(layer, expert)]
              → victim(layer, candidates) → the resident expert to evict
              → on_access / on_load (bookkeeping only)

Axes: L MoE layers, E experts per layer, S slots per layer, D model width.

A policy is a small strategy object. It sees the cache only through a read-only `CacheView`, keeps its own
host-side state, and never touches device arrays: what it needs from the model comes once, as host arrays, in a
`PolicyContext` (the registry, ef_jax.policies.registry, is the only place a name becomes a policy). The same
object runs inside the device engine and the trace-replay simulator (which never calls `on_hidden`).

Prefetch requests may name any layer: a later layer of the current step, or any layer for the next step
(a request for a layer already routed this step is, by construction, for the next step). Requests for experts
already resident are ignored by the cache.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

Prefetch = tuple[int, int]  # (layer, expert)


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyContext:
    """What a policy may know about the model and the run, as host arrays handed over once (never device arrays).

    The engine builds it from the model (routers, norms, embeddings); the simulator from the trace (future).
    A field a run cannot supply is None, and a policy that needs it says so when it is built.
    """
    routers: list | None = None      # per MoE layer: router weight f32[D, E]
    norms: list | None = None        # per MoE layer: FFN-input RMSNorm scale f32[D]
    embed: Any = None                # token embedding table [V, D] (host numpy), for step-start predictions
    top_k: int = 0                   # K
    eps: float = 1e-6                # RMSNorm epsilon
    future: np.ndarray | None = None  # i[N, L, K]: the routing about to be replayed (simulator only)
    batch_size: int = 1              # tokens per step in `future`


@runtime_checkable
class Policy(Protocol):
    """Everything the cache, the engine and the simulator use of a policy. `BasePolicy` gives every member a
    default, so a policy states only what it changes, and no caller probes for a capability."""
    name: str
    flush_each_step: bool  # True: the cache invalidates every slot at step start (the "nocache" baseline)
    wants_hidden: bool     # True: the engine copies hidden states to the host and calls cache.hidden()
    hidden_point: str      # where on_hidden sees them: "moe" (a layer's output) or "attention" (its MoE input)
    layer_prefetches: bool  # False: on_route / on_hidden never prefetch (an all-hit layer may be dispatched first)
    device_scorer: object   # a PregateScorer the engine may apply on the device (then on_scores), or None
    needs_future: bool      # True: an offline oracle reading the whole future routing (the simulator's only)

    @classmethod
    def from_context(cls, context: PolicyContext | None, **kw) -> "Policy": ...
    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None: ...
    def on_step_start(self, step: int, token_ids: np.ndarray | None, view) -> list[Prefetch]: ...
    def on_route(self, layer: int, experts: Sequence[int], view) -> list[Prefetch]: ...
    def on_hidden(self, layer: int, hidden: np.ndarray, view) -> list[Prefetch]: ...
    def on_scores(self, layer: int, scores: np.ndarray, view) -> list[Prefetch]: ...
    def on_step_end(self, step: int, view) -> list[Prefetch]: ...
    def on_access(self, layer: int, expert: int, hit: bool) -> None: ...
    def on_load(self, layer: int, expert: int, kind: str) -> None: ...
    def on_measure(self, *, layer_compute_s: float | None, copy_s: float | None, copy_bytes: int) -> None: ...
    def victim(self, layer: int, candidates: Sequence[int], view) -> int: ...
    def prefetch_distance(self) -> float | None: ...
    def predicts_reuse(self, layer: int, expert: int, view) -> bool: ...


class BasePolicy:
    """Defaults for every Policy member; `victim` must be overridden.

    Hook order per step (ExpertCache drives it): on_step_start → for each layer in order: [on_access per needed
    expert, on_load per demand load (victim when a slot must be freed)] → on_route → (engine only) on_hidden →
    ... → on_step_end. on_load(kind="prefetch") fires for every prefetch the cache performs. on_measure gets the
    engine's or simulator's timings whenever they are measured.
    """
    name = "base"
    flush_each_step = False
    wants_hidden = False  # hidden states cost a device→host copy per layer: only fetched for policies that ask
    # "moe": after the layer's experts (its output); "attention": the residual after its attention, the MoE's
    # input, seen right after the layer's demand loads are issued and before its experts compute
    hidden_point = "moe"
    # True: on_route / on_hidden may return prefetches. A prefetch for the next layer must ride in the current
    # layer's program, so the engine then makes every decision of a layer before dispatching it; False (policies
    # that only evict) lets it dispatch a layer whose experts have all landed first, and account while it computes
    layer_prefetches = True
    # a PregateScorer whose routers the engine may apply on the device, inside the program that computes the hidden
    # state: it then calls on_scores with every MoE layer's pre-gate logits instead of on_hidden (attention point)
    device_scorer = None
    needs_future = False  # True: reads PolicyContext.future (refused where decoding cannot know it: ef_jax.cache.support)

    @classmethod
    def from_context(cls, context: PolicyContext | None, **kw) -> "BasePolicy":
        """Built by the registry; policies that need the model or the future override this."""
        return cls(**kw)

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        self.num_layers, self.num_experts, self.slots_per_layer = num_layers, num_experts, slots_per_layer

    def on_step_start(self, step: int, token_ids: np.ndarray | None, view) -> list[Prefetch]:
        return []

    def on_route(self, layer: int, experts: Sequence[int], view) -> list[Prefetch]:
        return []

    def on_hidden(self, layer: int, hidden: np.ndarray, view) -> list[Prefetch]:
        return []

    def on_scores(self, layer: int, scores: np.ndarray, view) -> list[Prefetch]:
        """Engine only, for a policy with a device_scorer: scores f32[L, B, E], every MoE layer's pre-gate logits
        for the newest position of each row at `layer`'s attention point (what on_hidden would have computed)."""
        return []

    def on_step_end(self, step: int, view) -> list[Prefetch]:
        return []

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        pass

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        pass

    def on_measure(self, *, layer_compute_s: float | None = None, copy_s: float | None = None,
                   copy_bytes: int = 0) -> None:
        pass

    def prefetch_distance(self) -> float | None:
        """Mean prefetch distance in layers (None: the policy does not prefetch ahead by layers)."""
        return None

    def predicts_reuse(self, layer: int, expert: int, view) -> bool:
        """Whether `expert`, missing at `layer` now, will be needed there again within the policy's horizon (a
        load then pays for itself; ef_jax.cache.host_compute). History-only policies bet on temporal locality:
        it was needed at this layer in the previous step."""
        prev = view.routed(view.step - 1, layer)
        return prev is not None and expert in prev.tolist()

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement victim()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Recency:
    """Last-touch clock per (layer, expert): the LRU order that several policies evict by (reused by composition).
    """

    def __init__(self, num_layers: int, num_experts: int):
        self._clock = 0
        self.last = [[-1] * num_experts for _ in range(num_layers)]  # int[L][E]: clock of the last touch

    def touch(self, layer: int, expert: int) -> None:
        self._clock += 1
        self.last[layer][expert] = self._clock

    def oldest(self, layer: int, candidates: Sequence[int]) -> int:
        return min(candidates, key=self.last[layer].__getitem__)


def require_model_context(name: str, context: PolicyContext | None) -> PolicyContext:
    """The context a model-bound policy (routers and hidden states) needs, or a ValueError saying where it runs."""
    if context is None or context.routers is None or context.norms is None:
        raise ValueError(f"policy {name!r} needs the model's routers and hidden states: use it in the engine "
                         f"(OffloadConfig(policy={name!r})), not in the trace simulator")
    return context
