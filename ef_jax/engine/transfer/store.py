"""ExpertStore: a model's routed experts in host memory, in the one layout every expert source reads, and the
device slot pools it fills.

host: arrays[j] = one pinned_host array [E, W] per MoE layer: row e is expert e, flat in the row layout of
      ef_jax.host_experts (float gate | up | down in the host dtype, or a quantized expert's u8 bytes). The layer
      mode copies one row per load (`fetch`, or inside the expert program); the device step slices the same arrays
      inside its step program. One copy per model, whichever modes run (ef_jax.engine.transfer.residency).
      host_memory="mapped": nothing is pinned; a load reads its row from the checkpoint files through the page cache
      (pageable, slower) — for hosts that cannot hold every expert.
device: one stacked ExpertPool(gate [L, S, D, F], up [L, S, D, F], down [L, S, F, D]) for every MoE layer, written
      in place (the pool is donated to every program that writes it, so it is never re-allocated); one pytree
      lets a layer's program also write later layers' slots (prefetches travelling in an earlier program).

Axes: j MoE layer (0..L_moe-1), E experts, S slots, D model, F expert FFN width, W elements of a row.
The row format (flat, host dtype) is separate from the compute layout: slot writes unpack it (`put_expert`), and the
expert FFN upcasts a narrower host dtype (bf16 under float32 compute) inside its program.

Quantized experts (layout.quant set): a row is the expert's codes, scales and offsets as u8[B]
(ef_jax.quant.pool.expert_bytes), the pools are QuantExpertPools of S slots, `write_slot` unpacks the row into every
leaf of the slot, and bytes_per_expert is B (the quantized size), so budgets and H2D counters count quantized bytes.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ef_jax.engine.transfer import residency
from ef_jax.host_experts import ExpertRows
from ef_jax.model import Model
from ef_jax.models.moe import ExpertPool
from ef_jax.quant import pool as qpool

HOST_MEMORY = ("pinned", "mapped")


def store_for(model: Model, host_memory: str = "pinned") -> "ExpertStore":
    """The model's ExpertStore, built once per model and host_memory kind and shared by every offloaded run, layer
    mode and device step alike (pinning is the expensive part); `residency.drop(model, "store")` frees it."""
    if host_memory not in HOST_MEMORY:
        raise ValueError(f"host_memory={host_memory!r} must be one of {HOST_MEMORY}")
    if model.experts is None:
        raise ValueError("this model has no MoE layers: there are no experts to offload (use offload=None)")
    return residency.cached(model, f"store:{host_memory}", lambda: ExpertStore(model.experts, host_memory=host_memory))


def memory_sharding(device, kind: str) -> SingleDeviceSharding:
    """`device`'s memory of `kind` ("device" | "pinned_host"); RuntimeError when this jax build lacks it."""
    kinds = {m.kind for m in device.addressable_memories()}
    if kind not in kinds:
        raise RuntimeError(f"device {device} has no '{kind}' memory (has {sorted(kinds)}); expert offloading "
                           "needs a jax/jaxlib build with pinned host memory support")
    return SingleDeviceSharding(device, memory_kind=kind)


def available_host_bytes() -> int:
    """Host memory the kernel can still give (MemAvailable); EF_JAX_HOST_MEMORY_AVAILABLE (bytes) overrides it
    (tests force the mapped path on a small checkpoint this way)."""
    forced = os.environ.get("EF_JAX_HOST_MEMORY_AVAILABLE")
    if forced:
        return int(forced)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return int(psutil.virtual_memory().available)


def check_pinned_fits(nbytes: int, transient: int) -> None:
    """ValueError (one line, naming host_memory='mapped') when pinning `nbytes` (+ one layer read on the way) does not
    fit the host's available memory. Called before anything is read."""
    free = available_host_bytes()
    if nbytes + transient > free:
        raise ValueError(f"pinning the routed experts needs {(nbytes + transient) / 2**30:.2f} GiB of host memory "
                         f"and {free / 2**30:.2f} GiB is available: use OffloadConfig(host_memory='mapped') "
                         "(--host-memory mapped) to read them from the page cache instead")


@functools.partial(jax.jit, static_argnames=("sharding",))
def _row(stack: jax.Array, e: jax.Array, sharding) -> jax.Array:
    """Row e of a host stack [E, W] moved to `sharding`'s memory: a dynamic slice then a move, which XLA makes a
    host→device copy of one row (the device step's in-program pattern)."""
    W = stack.shape[1]
    return jax.device_put(jax.lax.dynamic_slice(stack, (e, 0), (1, W))[0], sharding)


class ExpertStore:
    """Every routed expert of every MoE layer in host memory (see the module docstring).

    rows: the model's ExpertRows; experts: (start, stop) to hold only that block of every layer (a mesh device's
    share), default all; host_memory: "pinned" (one pinned [E, W] array per layer) or "mapped" (rows read on
    demand)."""

    def __init__(self, rows: ExpertRows, device=None, experts: tuple[int, int] | None = None,
                 host_memory: str = "pinned"):
        device = device or jax.devices()[0]
        self.device, self.rows, self.host_memory = device, rows, host_memory
        self.device_sharding = memory_sharding(device, "device")
        layout = self.layout = rows.layout
        self.start, stop = experts or (0, layout.num_experts)
        self.num_experts, self.hidden, self.ffn = stop - self.start, layout.hidden, layout.ffn
        self.quantized = layout.quant is not None
        self.dtype = np.dtype(layout.dtype)  # of a row's elements (float host dtype, or u8)
        self.bytes_per_expert = layout.bytes_per_expert
        self._like = None
        if self.quantized:  # a one-expert host pool: the per-expert shapes and dtypes of the slot pools
            self._like = qpool.QuantExpertPool(bits=layout.bits, **{"gate_offset": None, "up_offset": None,
                                                                    "down_offset": None, **{
                n: np.zeros((1, *shape), dt) for n, shape, dt in layout.quant}})
        self.arrays: tuple[jax.Array, ...] = ()
        if host_memory == "mapped":
            if not rows.mapped:
                raise ValueError("host_memory='mapped' reads experts from their files, and these experts have no "
                                 "file (a model built in memory): use host_memory='pinned'")
            return
        self.host_sharding = memory_sharding(device, "pinned_host")
        per_layer = self.num_experts * self.bytes_per_expert
        check_pinned_fits(per_layer * rows.num_layers, per_layer)
        stacks = []
        for j in range(rows.num_layers):  # one layer's rows on the host at a time, released once pinned
            block = rows.rows(j, self.start, stop)
            stacks.append(jax.device_put(block, self.host_sharding))
            stacks[-1].block_until_ready()
            del block
        self.arrays = tuple(stacks)

    @property
    def num_layers(self) -> int:
        return self.rows.num_layers

    def host_bytes(self) -> dict[str, int]:
        """Host bytes of the experts: pinned by this store, or left in files and read on demand (mapped)."""
        total = self.num_layers * self.num_experts * self.bytes_per_expert
        return {"host_bytes_pinned": total if self.arrays else 0,
                "host_bytes_mapped": 0 if self.arrays else total}

    def host_row(self, layer: int, expert: int) -> np.ndarray:
        """Expert `expert` (index within this store's block) of MoE layer `layer` as host numpy [W]."""
        if self.arrays:
            return np.asarray(_row(self.arrays[layer], np.int32(expert), memory_sharding(self.device, "device")))
        e = self.start + expert
        return self.rows.rows(layer, e, e + 1)[0]

    def fetch(self, layer: int, expert: int) -> jax.Array:
        """Starts the host→device copy of one expert; returns the (future) device buffer [W]."""
        if self.arrays:
            return _row(self.arrays[layer], np.int32(expert), self.device_sharding)
        return jax.device_put(self.host_row(layer, expert), self.device_sharding)

    def program_source(self, layer: int, expert: int) -> tuple[jax.Array | np.ndarray, int]:
        """(host array [n, W], row) an expert program slices and copies in-program (the program copier): the
        layer's pinned stack and the expert's row, or (mapped) the expert's row read now, as [1, W], and 0."""
        if self.arrays:
            return self.arrays[layer], expert
        return self.host_row(layer, expert)[None], 0

    def empty_pools(self, slots: int):
        """The stacked slot pool of every MoE layer, zero-filled: an ExpertPool (or, for quantized experts, a
        QuantExpertPool) of [L, S, ...] leaves, in the host dtype."""
        L, D, F = self.num_layers, self.hidden, self.ffn
        if self.quantized:
            put = lambda a: jax.device_put(a, self.device_sharding)
            return jax.tree.map(lambda a: put(np.zeros((L, slots, *a.shape[1:]), a.dtype)), self._like)
        zeros = lambda shape: jax.device_put(np.zeros(shape, self.dtype), self.device_sharding)
        return ExpertPool(gate=zeros((L, slots, D, F)), up=zeros((L, slots, D, F)), down=zeros((L, slots, F, D)))

    empty_pool = empty_pools  # the device step's name

    def verify(self, pool, expert_of_slot: np.ndarray) -> None:
        """Debug check: every occupied slot holds exactly its expert's row (RuntimeError otherwise)."""
        leaves = None if self.quantized else [np.asarray(a) for a in (pool.gate, pool.up, pool.down)]
        for j in range(self.num_layers):
            for s, e in enumerate(np.asarray(expert_of_slot[j]).tolist()):
                if e < 0:
                    continue
                if self.quantized:
                    got = qpool.slot_bytes(jax.tree.map(lambda a: a[j], pool), s)
                else:
                    got = np.concatenate([m[j, s].ravel() for m in leaves])
                if not np.array_equal(got, self.host_row(j, e)):
                    raise RuntimeError(f"slot {s} of MoE layer {j} should hold expert {e} but its bytes differ")


def unpack(flat: jax.Array, D: int, F: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One expert's flat row [3·D·F] → (gate [D, F], up [D, F], down [F, D])."""
    return flat[:D * F].reshape(D, F), flat[D * F:2 * D * F].reshape(D, F), flat[2 * D * F:].reshape(F, D)


def put_expert(pool, flat: jax.Array, layer: jax.Array, slot: jax.Array):
    """pool with expert `flat` (float [3·D·F], or u8[B] for a QuantExpertPool) written at (layer, slot) — traced
    indices, so no recompiles per slot."""
    if isinstance(pool, qpool.QuantExpertPool):
        return qpool.write_expert(pool, flat, layer, slot)
    _, _, D, F = pool.gate.shape
    g, u, d = unpack(flat, D, F)
    put = lambda buf, w: _update_bits(buf, w[None, None].astype(buf.dtype), (layer, slot, 0, 0))
    return ExpertPool(gate=put(pool.gate, g), up=put(pool.up, u), down=put(pool.down, d))


def _update_bits(buf: jax.Array, w: jax.Array, at: tuple) -> jax.Array:
    """lax.dynamic_update_slice(buf, w, at), on the CPU backend done on the float's bits (same-width unsigned
    ints, so the result is bit for bit the same). Why: XLA's CPU float normalisation runs a bf16
    dynamic-update-slice in f32 — it converts the whole buffer to f32 and back around the write, a pass over the
    whole pool per copied expert (seen in the step's HLO: one expert write cost ~130 µs for a 6 MB pool, ~15 µs
    as bits). Integers are left alone, and the write stays in place. Other backends write floats natively."""
    if jax.default_backend() != "cpu" or not jnp.issubdtype(buf.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice(buf, w, at)
    bits = jnp.dtype(f"uint{buf.dtype.itemsize * 8}")
    as_bits = lambda a: jax.lax.bitcast_convert_type(a, bits)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_update_slice(as_bits(buf), as_bits(w), at), buf.dtype)


def put_experts(pool, flats, layers: jax.Array, slots: jax.Array):
    """put_expert of n experts. flats: [n, W] (float, or u8 for a QuantExpertPool), or a list of n rows [1, W] (the
    layer program's copies: float rows are then never concatenated); layers, slots i32[n], traced. Rows are written
    as if in order: a row that a later row overwrites at the same (layer, slot) is dropped (its layer set out of
    range), since a scatter with duplicate indices may keep either.
    A quantized pool takes one scatter per leaf (the program does not grow with n). A float pool takes one in-place
    dynamic_update_slice per row, each under a cond that skips a dropped row: XLA's CPU backend computes a bf16
    scatter (and a bf16 concatenate) in f32, converting the whole stacked pool to f32 and back around the scatter —
    3 × 0.68 GiB of temporaries for 2 MoE layers × 31 slots of DeepSeek-V2-Lite experts, and the bf16 layer-mode
    generate peaked at 7.5 GiB against issue 24's 5.9 GiB bound. (Measured on that program: scatter 3.1 GiB of
    temporaries, a fori_loop of writes 1.2 GiB, this chain 0.3 GiB more than the copied rows.)"""
    L = pool.gate.shape[0]
    same = (layers[:, None] == layers[None, :]) & (slots[:, None] == slots[None, :])  # bool[n, n]
    layers = jnp.where(jnp.triu(same, k=1).any(axis=1), L, layers)
    if isinstance(pool, qpool.QuantExpertPool):
        flats = jnp.concatenate(flats) if isinstance(flats, (list, tuple)) else flats
        return qpool.write_experts(pool, flats, layers, slots)
    rows = list(flats) if isinstance(flats, (list, tuple)) else [flats[i:i + 1] for i in range(flats.shape[0])]
    for i, row in enumerate(rows):
        pool = jax.lax.cond(layers[i] < L, lambda p, r=row, i=i: put_expert(p, r[0], layers[i], slots[i]),
                            lambda p: p, pool)
    return pool


@functools.partial(jax.jit, donate_argnums=(0,))
def write_slot(pool: ExpertPool, flat: jax.Array, layer: jax.Array, slot: jax.Array) -> ExpertPool:
    """Writes one expert (flat [3·D·F], on the device) into (layer, slot) of the donated stacked pool, in place."""
    return put_expert(pool, flat, layer, slot)
