"""History-only eviction policies: nocache, LRU, LFU (no prefetching).

[on_access / on_load] → recency and frequency counters per (layer, expert) → victim = least recent / least frequent

Axes: L MoE layers, E experts per layer, S slots per layer.
"""
from __future__ import annotations

from typing import Sequence

from ef_jax.policies.base import BasePolicy, Recency


class NoCache(BasePolicy):
    """Baseline: every slot is invalidated at step start, so every needed expert is copied every step."""
    name = "nocache"
    flush_each_step = True
    layer_prefetches = False

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        return candidates[0]  # only reachable within one step; nothing survives a step anyway


class LRU(BasePolicy):
    """Evict the resident expert whose last access (or prefetch load) is oldest."""
    name = "lru"
    layer_prefetches = False

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        self.recency = Recency(num_layers, num_experts)

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        if kind == "prefetch":  # a prefetched expert enters as most recent, else it would be evicted first
            self.recency.touch(layer, expert)

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        return self.recency.oldest(layer, candidates)


class LFU(BasePolicy):
    """Evict the resident expert with the fewest accesses since the start (all-time, not just while resident:
    expert popularity is a long-run property), ties broken by LRU."""
    name = "lfu"
    layer_prefetches = False

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        self.recency = Recency(num_layers, num_experts)
        self._count = [[0] * num_experts for _ in range(num_layers)]  # int[L][E]: accesses so far

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)
        self._count[layer][expert] += 1

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        if kind == "prefetch":  # recency only: a prediction is not an access
            self.recency.touch(layer, expert)

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        count, last = self._count[layer], self.recency.last[layer]
        return min(candidates, key=lambda e: (count[e], last[e]))
