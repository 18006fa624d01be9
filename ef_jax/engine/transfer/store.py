"""ExpertStore (pinned host memory) and the device slot pools it fills.

host: store[j][e] = one contiguous pinned_host buffer [3·D·F] per expert (gate | up | down, row-major),
      so a swap-in is exactly one host→device copy.
device: one stacked ExpertPool(gate [L, S, D, F], up [L, S, D, F], down [L, S, F, D]) for every MoE layer, written
      in place (the pool is donated to every program that writes it, so it is never re-allocated); one pytree
      lets a layer's program also write later layers' slots (prefetches travelling in an earlier program).

Axes: j MoE layer (0..L_moe-1), E experts, S slots, D model, F expert FFN width.
The store format (flat, compute dtype) is separate from the compute layout: quantized stores unpack here.

Quantized experts (host_experts[j] an ef_jax.quant.QuantExpertPool): store[j][e] is one flat u8 buffer [B] of the
expert's codes, scales and offsets (ef_jax.quant.pool.expert_bytes), the pools are QuantExpertPools of S slots,
`write_slot` unpacks the buffer into every leaf of the slot, and bytes_per_expert is B (the quantized size), so
budgets and H2D counters count quantized bytes.
"""
from __future__ import annotations

import functools
import weakref

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from ef_jax.model import Model
from ef_jax.models.moe import ExpertPool
from ef_jax.quant import pool as qpool

_STORES: "weakref.WeakKeyDictionary[Model, ExpertStore]" = weakref.WeakKeyDictionary()


def store_for(model: Model) -> "ExpertStore":
    """The pinned-host ExpertStore of every MoE layer's experts, built once per model and reused by every
    offloaded run (pinning is the expensive part). The model itself is left as it is."""
    store = _STORES.get(model)
    if store is None:
        store = ExpertStore([model.host_experts[i] for i in model.config.moe_layer_ids])
        _STORES[model] = store
    return store


def memory_sharding(device, kind: str) -> SingleDeviceSharding:
    """`device`'s memory of `kind` ("device" | "pinned_host"); RuntimeError when this jax build lacks it."""
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
        self.host_sharding = memory_sharding(device, "pinned_host")
        self.device_sharding = memory_sharding(device, "device")
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

    def empty_pools(self, slots: int):
        """The stacked slot pool of every MoE layer, zero-filled: an ExpertPool (or, for quantized experts, a
        QuantExpertPool) of [L, S, ...] leaves."""
        L, D, F = self.num_layers, self.hidden, self.ffn
        if self.quantized:
            put = lambda a: jax.device_put(a, self.device_sharding)
            return jax.tree.map(lambda a: put(np.zeros((L, slots, *a.shape[1:]), a.dtype)), self._like)
        zeros = lambda shape: jax.device_put(np.zeros(shape, self.dtype), self.device_sharding)
        return ExpertPool(gate=zeros((L, slots, D, F)), up=zeros((L, slots, D, F)), down=zeros((L, slots, F, D)))

    def verify(self, pool: ExpertPool, expert_of_slot: np.ndarray) -> None:
        """Debug check: every occupied slot holds exactly its expert's bytes (RuntimeError otherwise)."""
        gate, up, down = (None, None, None) if self.quantized else (np.asarray(pool.gate), np.asarray(pool.up),
                                                                    np.asarray(pool.down))
        for j in range(self.num_layers):
            for s, e in enumerate(expert_of_slot[j].tolist()):
                if e < 0:
                    continue
                if self.quantized:
                    got = qpool.slot_bytes(jax.tree.map(lambda a: a[j], pool), s)
                    if not np.array_equal(got, np.asarray(self.buffers[j][e])):
                        raise RuntimeError(f"slot {s} of MoE layer {j} should hold quantized expert {e} but its "
                                           "bytes differ")
                    continue
                got = np.concatenate([gate[j, s].ravel(), up[j, s].ravel(), down[j, s].ravel()])
                if not np.array_equal(got, np.asarray(self.buffers[j][e])):
                    raise RuntimeError(f"slot {s} of MoE layer {j} should hold expert {e} but its bytes differ")


def unpack(flat: jax.Array, D: int, F: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One expert's flat buffer [3·D·F] → (gate [D, F], up [D, F], down [F, D])."""
    return flat[:D * F].reshape(D, F), flat[D * F:2 * D * F].reshape(D, F), flat[2 * D * F:].reshape(F, D)


def put_expert(pool, flat: jax.Array, layer: jax.Array, slot: jax.Array):
    """pool with expert `flat` (float [3·D·F], or u8[B] for a QuantExpertPool) written at (layer, slot) — traced
    indices, so no recompiles per slot."""
    if isinstance(pool, qpool.QuantExpertPool):
        return qpool.write_expert(pool, flat, layer, slot)
    _, _, D, F = pool.gate.shape
    g, u, d = unpack(flat, D, F)
    put = lambda buf, w: jax.lax.dynamic_update_slice(buf, w[None, None].astype(buf.dtype), (layer, slot, 0, 0))
    return ExpertPool(gate=put(pool.gate, g), up=put(pool.up, u), down=put(pool.down, d))


@functools.partial(jax.jit, donate_argnums=(0,))
def write_slot(pool: ExpertPool, flat: jax.Array, layer: jax.Array, slot: jax.Array) -> ExpertPool:
    """Writes one expert (flat [3·D·F], on the device) into (layer, slot) of the donated stacked pool, in place."""
    return put_expert(pool, flat, layer, slot)
