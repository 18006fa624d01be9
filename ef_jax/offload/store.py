"""ExpertStore (pinned host memory) and the device slot pools it fills.

host: store[j][e] = one contiguous pinned_host buffer [3·D·F] per expert (gate | up | down, row-major),
      so a swap-in is exactly one host→device copy.
device: pools[j] = ExpertPool(gate [S, D, F], up [S, D, F], down [S, F, D]) per MoE layer j, written in place
      (the pool is donated to the jitted slot write, so no pool is ever re-allocated).

Axes: j MoE layer (0..L_moe-1), E experts, S slots, D model, F expert FFN width.
The store format (flat, compute dtype) is separate from the compute layout: quantized stores unpack here.

Quantized experts (host_experts[j] an ef_jax.quant.QuantExpertPool): store[j][e] is one flat u8 buffer [B] of the
expert's codes, scales and offsets (ef_jax.quant.pool.expert_bytes), the pools are QuantExpertPools of S slots,
`write_slot` unpacks the buffer into every leaf of the slot, and bytes_per_expert is B (the quantized size), so
budgets and H2D counters count quantized bytes.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from ef_jax.models.moe import ExpertPool
from ef_jax.quant import pool as qpool


def _memory_sharding(device, kind: str) -> SingleDeviceSharding:
    kinds = {m.kind for m in device.addressable_memories()}
    if kind not in kinds:
        raise RuntimeError(f"device {device} has no '{kind}' memory (has {sorted(kinds)}); expert offloading "
                           "needs a jax/jaxlib build with pinned host memory support")
    return SingleDeviceSharding(device, memory_kind=kind)


class ExpertStore:
    """Every routed expert of every MoE layer in pinned host memory, one flat buffer per expert."""

    def __init__(self, host_experts: list[dict[str, np.ndarray]], device=None):
        device = device or jax.devices()[0]
        self.device = device
        self.host_sharding = _memory_sharding(device, "pinned_host")
        self.device_sharding = _memory_sharding(device, "device")
        first = host_experts[0]
        self.buffers: list[list[jax.Array]] = []
        self.quantized = isinstance(first, qpool.QuantExpertPool)
        if self.quantized:  # one u8 buffer per expert: codes | scales | offsets
            self.num_experts, _, self.ffn = first.gate.shape
            self.hidden = first.down.shape[2]
            self.dtype = np.dtype(np.uint8)
            self._like = first
            for ex in host_experts:
                self.buffers.append([jax.device_put(qpool.expert_bytes(ex, e), self.host_sharding)
                                     for e in range(self.num_experts)])
            self.bytes_per_expert = qpool.expert_nbytes(first)
            return
        self.num_experts, self.hidden, self.ffn = first["gate"].shape
        self.dtype = first["gate"].dtype
        for ex in host_experts:
            flat = np.concatenate([ex["gate"].reshape(self.num_experts, -1), ex["up"].reshape(self.num_experts, -1),
                                   ex["down"].reshape(self.num_experts, -1)], axis=1)
            self.buffers.append([jax.device_put(flat[e], self.host_sharding) for e in range(self.num_experts)])
        self.bytes_per_expert = 3 * self.hidden * self.ffn * np.dtype(self.dtype).itemsize

    @property
    def num_layers(self) -> int:
        return len(self.buffers)

    def fetch(self, layer: int, expert: int) -> jax.Array:
        """Starts the host→device copy of one expert; returns the (future) device buffer [3·D·F]."""
        return jax.device_put(self.buffers[layer][expert], self.device_sharding)

    def empty_pools(self, slots: int) -> list:
        if self.quantized:
            put = lambda a: jax.device_put(a, self.device_sharding)
            return [qpool.empty_pool(self._like, slots, put) for _ in range(self.num_layers)]
        D, F = self.hidden, self.ffn
        zeros = lambda shape: jax.device_put(np.zeros(shape, self.dtype), self.device_sharding)
        return [ExpertPool(gate=zeros((slots, D, F)), up=zeros((slots, D, F)), down=zeros((slots, F, D)))
                for _ in range(self.num_layers)]

    def verify(self, pools: list[ExpertPool], expert_of_slot: np.ndarray) -> None:
        """Debug check: every occupied slot holds exactly its expert's bytes (RuntimeError otherwise)."""
        for j, pool in enumerate(pools):
            for s, e in enumerate(expert_of_slot[j].tolist()):
                if e < 0:
                    continue
                if self.quantized:
                    got = qpool.slot_bytes(pool, s)
                    if not np.array_equal(got, np.asarray(self.buffers[j][e])):
                        raise RuntimeError(f"slot {s} of MoE layer {j} should hold quantized expert {e} but its "
                                           "bytes differ")
                    continue
                got = np.concatenate([np.asarray(pool.gate[s]).ravel(), np.asarray(pool.up[s]).ravel(),
                                      np.asarray(pool.down[s]).ravel()])
                if not np.array_equal(got, np.asarray(self.buffers[j][e])):
                    raise RuntimeError(f"slot {s} of MoE layer {j} should hold expert {e} but its bytes differ")


@functools.partial(jax.jit, donate_argnums=(0,))
def write_slot(pool, flat: jax.Array, slot: jax.Array):
    """Writes one expert (flat [3·D·F], or u8[B] for a QuantExpertPool) into `slot` of a donated pool, in place.
    slot: traced i32 (no recompiles)."""
    if isinstance(pool, qpool.QuantExpertPool):
        return qpool.write_expert(pool, flat, slot)
    S, D, F = pool.gate.shape
    g, u, d = flat[:D * F].reshape(D, F), flat[D * F:2 * D * F].reshape(D, F), flat[2 * D * F:].reshape(F, D)
    put = lambda buf, w: jax.lax.dynamic_update_slice(buf, w[None].astype(buf.dtype), (slot, 0, 0))
    return ExpertPool(gate=put(pool.gate, g), up=put(pool.up, u), down=put(pool.down, d))
