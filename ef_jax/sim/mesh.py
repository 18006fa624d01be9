"""Mesh replay: the routing an expert-parallel run saw, replayed through one ExpertCache per device.

[per step: experts i[N_s, L, K]] → per device d: per step and layer, the sorted local ids of the experts it owns
(ef_jax.cache.partition, the engine's own split) → replay_steps on d's cache of min(S, E_d) slots → BatchedStats per
device, and their sum

Axes: N_s tokens of step s, L MoE layers, K top-k, E experts, E_d experts of device d, S slots per device and layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ef_jax.cache.partition import ExpertPartition
from ef_jax.sim.batched import BatchedStats, replay_steps


def device_steps(steps: Sequence[np.ndarray], partition: ExpertPartition, device: int) -> list[list[list[int]]]:
    """Per step, per layer: the local ids `device` must hold (the union over the step's tokens, ascending)."""
    out = []
    for routes in steps:
        routes = np.asarray(routes)
        out.append([partition.split(np.unique(routes[:, l]))[device].tolist() for l in range(routes.shape[1])])
    return out


def replay_mesh(steps: Sequence[np.ndarray], *, num_experts: int, num_devices: int, slots_per_layer: int,
                policy: str = "lru") -> list[BatchedStats]:
    """Each device's cache replayed on the steps of a run (e.g. an engine's `routing_log`: per step, the real
    tokens' experts i[N_s, L, K]). Returns one BatchedStats per device, in mesh order."""
    partition = ExpertPartition(num_experts, num_devices)
    if not steps:
        raise ValueError("no steps to replay")
    L = np.asarray(steps[0]).shape[1]
    tokens = sum(np.asarray(s).shape[0] for s in steps)
    return [replay_steps(device_steps(steps, partition, d), tokens, num_layers=L, num_experts=partition.sizes[d],
                         slots_per_layer=min(slots_per_layer, partition.sizes[d]), policy=policy)
            for d in range(num_devices)]
