"""ExpertStacks: every MoE layer's routed experts as one pinned-host stack, for the device-resident step.

host:   stacks[j] = pinned_host [E, W]: row e = expert e of MoE layer j, flat (gate | up | down, row-major, W = 3·D·F
        in the compute dtype; quantized experts: W = B bytes of codes | scales | offsets, u8)
device: the stacked slot pool [L, S, ...] (ExpertPool or QuantExpertPool), zero-filled, written in place

Why one stack per layer (not the ExpertStore's one buffer per expert): inside one jitted step the expert to copy is a
device value, so the program needs a single array to slice at a computed row — `lax.dynamic_slice`, which XLA turns
into a host→device copy of that row (a gather/`take` on host memory would become slow host compute instead).

Axes: j MoE layer (L of them), E experts, S slots, W elements of one flat expert.
"""
from __future__ import annotations

import weakref

import jax
import numpy as np

from ef_jax.engine.transfer.store import memory_sharding
from ef_jax.model import Model
from ef_jax.models.moe import ExpertPool
from ef_jax.quant import pool as qpool

_STACKS: "weakref.WeakKeyDictionary[Model, ExpertStacks]" = weakref.WeakKeyDictionary()


def stacks_for(model: Model) -> "ExpertStacks":
    """The model's ExpertStacks, built (and pinned) once per model and reused by every device-step run."""
    st = _STACKS.get(model)
    if st is None:
        st = ExpertStacks([model.host_experts[i] for i in model.config.moe_layer_ids])
        _STACKS[model] = st
    return st


def drop_stacks(model: Model) -> None:
    """Frees the pinned stacks of `model` (benchmarks switching between the layer and device modes)."""
    _STACKS.pop(model, None)


class ExpertStacks:
    """Per MoE layer, one pinned-host array of all its experts (flat rows)."""

    def __init__(self, host_experts: list, device=None):
        device = device or jax.devices()[0]
        self.device = device
        self.device_sharding = memory_sharding(device, "device")
        host = memory_sharding(device, "pinned_host")
        first = host_experts[0]
        self.quantized = isinstance(first, qpool.QuantExpertPool)
        if self.quantized:
            self.num_experts = first.gate.shape[0]
            self._like = first
            rows = [np.stack([qpool.expert_bytes(ex, e) for e in range(self.num_experts)]) for ex in host_experts]
            self.bytes_per_expert = qpool.expert_nbytes(first)
        else:
            self.num_experts, self.hidden, self.ffn = first["gate"].shape
            self.dtype = first["gate"].dtype
            E = self.num_experts
            rows = [np.concatenate([ex["gate"].reshape(E, -1), ex["up"].reshape(E, -1), ex["down"].reshape(E, -1)],
                                   axis=1) for ex in host_experts]
            self.bytes_per_expert = 3 * self.hidden * self.ffn * np.dtype(self.dtype).itemsize
        self.arrays: tuple[jax.Array, ...] = tuple(jax.device_put(r, host) for r in rows)  # pinned [E, W] each

    @property
    def num_layers(self) -> int:
        return len(self.arrays)

    def empty_pool(self, slots: int):
        """The zero-filled stacked slot pool [L, S, ...] on the device."""
        L = self.num_layers
        put = lambda a: jax.device_put(a, self.device_sharding)
        if self.quantized:
            return jax.tree.map(lambda a: put(np.zeros((L, slots, *a.shape[1:]), a.dtype)), self._like)
        D, F = self.hidden, self.ffn
        zeros = lambda shape: put(np.zeros(shape, self.dtype))
        return ExpertPool(gate=zeros((L, slots, D, F)), up=zeros((L, slots, D, F)), down=zeros((L, slots, F, D)))

    def verify(self, pool, expert_of_slot: np.ndarray) -> None:
        """Debug check: every occupied slot holds exactly its expert's row of the stack (RuntimeError otherwise)."""
        leaves = None if self.quantized else [np.asarray(a) for a in (pool.gate, pool.up, pool.down)]
        for j in range(self.num_layers):
            stack = np.asarray(self.arrays[j])
            for s, e in enumerate(np.asarray(expert_of_slot[j]).tolist()):
                if e < 0:
                    continue
                if self.quantized:
                    got = qpool.slot_bytes(jax.tree.map(lambda a: a[j], pool), s)
                else:
                    got = np.concatenate([m[j, s].ravel() for m in leaves])
                if not np.array_equal(got, stack[e]):
                    raise RuntimeError(f"slot {s} of MoE layer {j} should hold expert {e} but its bytes differ")
