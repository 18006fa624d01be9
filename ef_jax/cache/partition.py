"""ExpertPartition: which device of an expert-parallel mesh owns each routed expert, and the expert's index there.

experts 0..E-1 → n contiguous blocks (sizes differ by at most one, the larger first: E = 10 on 4 devices gives
3, 3, 2, 2) → owner[e], local[e]; a step's needed experts → one sorted list of local ids per device

Plain numpy (no jax): the engine's mesh sources and the simulator's mesh replay split routing with the same object,
so a per-device cache sees the same expert ids in both.

Axes: E experts, n devices, E_d experts of device d (E_max = the largest E_d).
"""
from __future__ import annotations

import numpy as np


class ExpertPartition:
    """Contiguous blocks of the E experts of every MoE layer over n devices (the same split at every layer)."""

    def __init__(self, num_experts: int, num_devices: int):
        if not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"num_devices={num_devices!r} must be a positive int")
        if num_devices > num_experts:
            raise ValueError(f"{num_devices} devices for {num_experts} experts per layer: every device must own at "
                             f"least one expert; use at most {num_experts} devices on the 'expert' axis")
        self.num_experts, self.num_devices = num_experts, num_devices
        base, extra = divmod(num_experts, num_devices)
        self.sizes = tuple(base + (d < extra) for d in range(num_devices))           # E_d
        self.starts = tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))       # first expert of device d
        self.owner = np.repeat(np.arange(num_devices, dtype=np.int32), self.sizes)   # i32[E]
        self.local = (np.arange(num_experts) - np.asarray(self.starts)[self.owner]).astype(np.int32)  # i32[E]
        self.max_size = max(self.sizes)                                               # E_max

    def experts_of(self, device: int) -> np.ndarray:
        """i32[E_d]: the global ids device `device` owns, ascending."""
        return np.arange(self.starts[device], self.starts[device] + self.sizes[device], dtype=np.int32)

    def split(self, needed: np.ndarray) -> list[np.ndarray]:
        """Sorted unique global ids → per device, the sorted local ids of those it owns (possibly empty)."""
        needed = np.asarray(needed)
        owners = self.owner[needed]
        return [self.local[needed[owners == d]] for d in range(self.num_devices)]

    def to_global(self, device: int, local_ids) -> np.ndarray:
        return np.asarray(local_ids, np.int32) + self.starts[device]

    def __repr__(self) -> str:
        return f"ExpertPartition(E={self.num_experts}, devices={self.num_devices}, sizes={self.sizes})"
