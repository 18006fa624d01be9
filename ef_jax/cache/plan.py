"""One MoE layer's host plan: the passes of a batch's union, route vs require, where the policy's observation goes,
and the release order — the same for every expert source (layer mode, device step's shadow cache, mesh) and for
the simulators (ef_jax.sim), so their counts agree on multi-pass batches too.

needed experts (per cache: one, or one per device of a mesh) → passes of ≤ S experts each
per pass n: per cache with a share left: [poll] → route (n = 0) | require (n > 0) → Loads → issue
            → (n = 0) the policy's observation of the layer input → Loads → issue → [wait for the pass's experts]
         → compute the pass → (not the last pass) release: the next pass may evict this pass's experts
after the last pass: the caller taps the layer output, then releases (release_all)

Axes: E experts, S slots per layer, n passes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ef_jax.cache.expert_cache import ExpertCache, Load


def split(needed: np.ndarray, slots: int) -> list[np.ndarray]:
    """needed i32[U] (ascending, unique) → passes of at most `slots` experts; one empty pass when U = 0 (the
    layer still runs: its shared expert, a policy's hooks)."""
    needed = np.asarray(needed)
    return [needed[s:s + slots] for s in range(0, max(len(needed), 1), slots)]


@dataclasses.dataclass(frozen=True)
class Pass:
    index: int
    count: int                # passes of the layer (the most any cache needs)
    chunks: tuple             # per cache: the experts this pass makes resident, or None (no share left)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index + 1 == self.count

    @property
    def active(self) -> list[int]:
        return [d for d, c in enumerate(self.chunks) if c is not None]


def passes(shares: Sequence[np.ndarray], slots: Sequence[int]) -> list[Pass]:
    """The layer's passes for caches of `slots` each needing `shares` (one cache: one share)."""
    chunks = [split(share, s) for share, s in zip(shares, slots)]
    count = max(len(c) for c in chunks)
    return [Pass(n, count, tuple(c[n] if n < len(c) else None for c in chunks)) for n in range(count)]


def run_layer(caches: Sequence[ExpertCache], layer: int, shares: Sequence[np.ndarray], *,
              issue: Callable[[int, list[Load]], None], compute: Callable[[Pass], None],
              observe: Callable[[int], list[Load]] | None = None, poll: Callable[[int, Pass], None] | None = None,
              wait: Callable[[int, np.ndarray], None] | None = None,
              hosted: Sequence[tuple] | None = None) -> int:
    """Drives one MoE layer through its passes (module docstring). Callbacks, per cache index d:
      issue(d, loads): perform the Loads (copier, clock; the simulator's copy stream)
      observe(d): the policy's look at the layer input (cache.hidden / cache.scores), after the first pass's
        demand loads and before its compute; returns Loads
      poll(d, pass): before the pass's decisions (land finished copies)
      wait(d, chunk): after them (the pass's experts are in their slots)
      compute(pass): runs the pass; unless it is the last, it has finished reading its experts when it returns
    hosted[d]: (experts computed on the host, those of them copied in behind the layer, held prefetch requests
    loaded ahead of those, spare idle copies) for cache d's first route (host_compute;
    ef_jax.cache.host_compute.plan_layer), or None
    Returns the number of passes; the caller releases the caches after the last (release_all)."""
    plan = passes(shares, [c.table.slots_per_layer for c in caches])
    for p in plan:
        for d in p.active:
            cache, chunk = caches[d], p.chunks[d]
            if poll is not None:
                poll(d, p)
            if p.first:
                issue(d, cache.route(layer, chunk, *hosted[d]) if hosted else cache.route(layer, chunk))
            else:
                issue(d, cache.require(layer, chunk))
            if p.first and observe is not None:
                issue(d, observe(d))
            if p.first:
                cache.close_idle()  # the layer's idle copy time (host_compute) is for requests made before here
            if wait is not None:
                wait(d, chunk)
        compute(p)
        if not p.last:
            for d in p.active:
                caches[d].release(layer)
    return len(plan)


def release_all(caches: Sequence[ExpertCache], layer: int) -> None:
    for cache in caches:
        cache.release(layer)
