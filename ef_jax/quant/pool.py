"""QuantExpertPool: routed experts held as int8/int4 codes + float16 scales (+ offsets), and their dequantization.

host: a QuantExpertPool of numpy arrays with S = E (every expert), one MoE layer at a time (ef_jax.quant.cache)
      → one expert's bytes = concatenation of its slice of every leaf, as u8 (`expert_bytes`): one pinned buffer,
        one host→device copy per swap, exactly like the float store
device: a QuantExpertPool of S slots; `write_expert` unpacks one expert's u8 buffer into slot s of every leaf
      → the expert FFN dequantizes only what it reads (`dequantize`, fused into its jitted computation)

Axes: S slots, D model, F expert FFN width, b bits, G rows per group along each matrix's input axis
(gate/up: D, down: F), B bytes of one expert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax import pytree
from ef_jax.quant.codes import QTensor, QuantSpec, quantize

MATRICES = ("gate", "up", "down")


@pytree.dataclass
class QuantExpertPool:
    """Routed expert weights of S slots, quantized group-wise along each matrix's input axis."""
    gate: jax.Array               # u8[S, D·b/8, F] codes (int4: planar-packed halves of D)
    up: jax.Array                 # u8[S, D·b/8, F]
    down: jax.Array               # u8[S, F·b/8, D]
    gate_scale: jax.Array         # f16[S, D/G, F]
    up_scale: jax.Array           # f16[S, D/G, F]
    down_scale: jax.Array         # f16[S, F/G, D]
    gate_offset: jax.Array | None  # f16[S, D/G, F]; None when symmetric (then w = (u − 2^(b−1))·s)
    up_offset: jax.Array | None    # f16[S, D/G, F]
    down_offset: jax.Array | None  # f16[S, F/G, D]
    bits: int = pytree.field(pytree_node=False, default=4)

    @property
    def num_slots(self) -> int:
        return self.gate.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.gate_offset is None

    def leaves(self) -> list[tuple[str, jax.Array]]:
        """(field, array) in the fixed order of an expert's byte buffer."""
        names = [*MATRICES, *(f"{m}_scale" for m in MATRICES)]
        if not self.symmetric:
            names += [f"{m}_offset" for m in MATRICES]
        return [(n, getattr(self, n)) for n in names]

    def matrix(self, name: str, slots=None, dtype=jnp.float32) -> jax.Array:
        """Dequantized `name` ("gate" | "up" | "down") of `slots` (an int array of any shape, None = all):
        [*slots.shape, I, O] in `dtype`."""
        pick = (lambda a: a) if slots is None else (lambda a: None if a is None else a[slots])
        return dequantize(pick(getattr(self, name)), pick(getattr(self, f"{name}_scale")),
                          pick(getattr(self, f"{name}_offset")), self.bits, dtype)


def dequantize(codes, scale, offset, bits: int, dtype=jnp.float32) -> jax.Array:
    """codes u8[..., I·b/8, O], scale (and offset) f16[..., I/G, O] → [..., I, O] in dtype (computed in f32)."""
    u = jnp.concatenate([codes & 0xF, codes >> 4], axis=-2) if bits == 4 else codes
    *lead, rows, cols = u.shape
    groups = scale.shape[-2]
    ug = u.astype(jnp.float32).reshape(*lead, groups, rows // groups, cols)
    s = scale.astype(jnp.float32)[..., :, None, :]
    if offset is None:
        w = (ug - (1 << (bits - 1))) * s
    else:
        w = ug * s + offset.astype(jnp.float32)[..., :, None, :]
    return w.reshape(u.shape).astype(dtype)


# ---- host side ---------------------------------------------------------------------------------------------


def quantize_experts(ex: dict[str, np.ndarray], spec: QuantSpec) -> QuantExpertPool:
    """{"gate" [E, D, F], "up" [E, D, F], "down" [E, F, D]} (host float) → QuantExpertPool of numpy arrays."""
    q: dict[str, QTensor] = {m: quantize(ex[m], spec) for m in MATRICES}
    fields = {}
    for m in MATRICES:
        fields[m], fields[f"{m}_scale"], fields[f"{m}_offset"] = q[m].codes, q[m].scale, q[m].offset
    return QuantExpertPool(bits=spec.bits, **fields)


def expert_bytes(pool: QuantExpertPool, e: int) -> np.ndarray:
    """Expert e of a host pool as one flat u8 buffer [B] (leaves in `leaves()` order, each C-contiguous)."""
    return np.concatenate([np.ascontiguousarray(np.asarray(a[e])).view(np.uint8).reshape(-1)
                           for _, a in pool.leaves()])


def expert_nbytes(pool: QuantExpertPool) -> int:
    """B: bytes of one expert (codes + scales + offsets)."""
    return sum(int(np.prod(a.shape[1:])) * np.dtype(a.dtype).itemsize for _, a in pool.leaves())


def empty_pool(like: QuantExpertPool, slots: int, put=jnp.asarray) -> QuantExpertPool:
    """A zero pool of `slots` slots with `like`'s per-expert shapes and dtypes; `put` places each leaf."""
    return jax.tree.map(lambda a: put(np.zeros((slots, *a.shape[1:]), a.dtype)), like)


# ---- device side (inside the jitted slot write) ---------------------------------------------------------------


def write_expert(pool: QuantExpertPool, flat: jax.Array, layer: jax.Array, slot: jax.Array) -> QuantExpertPool:
    """Unpacks one expert's u8[B] buffer into (layer, slot) of every leaf of a stacked pool ([L, S, ...] leaves;
    dynamic_update_slice, the caller donates)."""
    out, off = {}, 0
    for name, buf in pool.leaves():
        shape, dt = buf.shape[2:], jnp.dtype(buf.dtype)
        n = int(np.prod(shape)) * dt.itemsize
        raw = flat[off:off + n]
        off += n
        vals = raw if dt == jnp.uint8 else jax.lax.bitcast_convert_type(raw.reshape(-1, dt.itemsize), dt)
        out[name] = jax.lax.dynamic_update_slice(buf, vals.reshape(1, 1, *shape), (layer, slot) + (0,) * len(shape))
    assert off == flat.shape[0], (off, flat.shape)
    return pool.replace(**out)


def write_experts(pool: QuantExpertPool, flats: jax.Array, layers: jax.Array, slots: jax.Array) -> QuantExpertPool:
    """write_expert of n experts in one scatter per leaf: flats u8[n, B]; layers, slots i32[n] (an index out of
    range is dropped: ef_jax.engine.transfer.store.put_experts marks superseded rows so)."""
    out, off = {}, 0
    n = flats.shape[0]
    for name, buf in pool.leaves():
        shape, dt = buf.shape[2:], jnp.dtype(buf.dtype)
        size = int(np.prod(shape)) * dt.itemsize
        raw = flats[:, off:off + size]
        off += size
        vals = raw if dt == jnp.uint8 else jax.lax.bitcast_convert_type(raw.reshape(n, -1, dt.itemsize), dt)
        out[name] = buf.at[layers, slots].set(vals.reshape(n, *shape), mode="drop")
    assert off == flats.shape[1], (off, flats.shape)
    return pool.replace(**out)


def slot_bytes(pool: QuantExpertPool, s: int) -> np.ndarray:
    """Slot s of a device pool as the flat u8 buffer `expert_bytes` would give (for ExpertStore.verify)."""
    return expert_bytes(pool, s)
