"""Counters of what the host does per step: named sync points (device → host waits) and dispatched programs.

Levanter-style: the host touches device values only at named points, and a counter says how many ran, so
"one sync per MoE layer" is a number in `stats`, not a belief.
"""
from __future__ import annotations

import collections

import numpy as np


class HostCounters:
    def __init__(self):
        self.syncs: collections.Counter = collections.Counter()  # sync-point name → times it ran
        self.dispatches = 0                                        # jitted programs and transfers dispatched
        self.steps = 0                                             # forward steps (prefill or decode)

    def to_host(self, point: str, x, *more):
        """The named sync point: block until `x` is computed and copy it to the host. Given more arrays (outputs
        of the same program, so ready together), one sync returns them all as a tuple of numpy arrays."""
        self.syncs[point] += 1
        if more:
            return tuple(np.asarray(a) for a in (x, *more))
        return np.asarray(x)

    def stats(self) -> dict:
        syncs = sum(self.syncs.values())
        steps = max(self.steps, 1)
        return {"host_syncs": syncs, "host_syncs_per_step": syncs / steps, "dispatches": self.dispatches,
                "dispatches_per_step": self.dispatches / steps, "sync_points": dict(self.syncs)}
