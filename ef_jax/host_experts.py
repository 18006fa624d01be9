"""Where a model's routed experts are read from: one MoE layer's rows at a time, never a full copy of them all.

[safetensors shards | packed quantized file | numpy (random models)] → rows(j) → u[E, W] of MoE layer j
    → the engine pins them (ef_jax.engine.transfer.store: one pinned [E, W] array per MoE layer, the one layout
      every expert source reads) or, with host_memory="mapped", reads single rows from the page cache on demand.

Row layout (one expert, flat, C order), the contract every reader of the pinned buffers relies on:
  float:     gate [D, F] | up [D, F] | down [F, D]                     W = 3·D·F elements of the host dtype
  quantized: every leaf of ef_jax.quant.pool.QuantExpertPool in `leaves()` order (codes, scales, offsets),
             each the expert's slice as raw bytes                        W = B bytes (u8)
The host dtype of float experts is the checkpoint's stored dtype when it is narrower than the compute dtype
(bf16 experts stay bf16 under float32 compute: the expert FFN upcasts what it reads, exactly), else the compute dtype.

Axes: j MoE layer (0..L−1), E experts, D model, F expert FFN width, W elements of one row.
No jax here: this is plain host numpy and file reads (the engine moves the rows).
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes
import numpy as np

ST_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
             "F64": np.dtype(np.float64), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8)}


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What one row holds. quant: per leaf (name, per-expert shape, dtype name), in the row's order; None: float."""
    num_experts: int   # E
    hidden: int        # D
    ffn: int           # F
    dtype: np.dtype    # of the row's elements (the float host dtype, or uint8)
    width: int         # W
    quant: tuple | None = None
    bits: int | None = None

    @property
    def bytes_per_expert(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of one MoE layer's rows."""
        return self.num_experts * self.bytes_per_expert

    @classmethod
    def floats(cls, E: int, D: int, F: int, dtype) -> "RowLayout":
        return cls(E, D, F, np.dtype(dtype), 3 * D * F)

    @classmethod
    def quantized(cls, pool) -> "RowLayout":
        """The layout of a host QuantExpertPool's rows (ef_jax.quant.pool.expert_bytes)."""
        leaves = tuple((n, tuple(a.shape[1:]), np.dtype(a.dtype).name) for n, a in pool.leaves())
        width = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in leaves)
        E, _, F = pool.gate.shape
        return cls(E, pool.down.shape[2], F, np.dtype(np.uint8), width, leaves, pool.bits)


def float_rows(ex: dict, dtype=None) -> np.ndarray:
    """{"gate" [n, D, F], "up" [n, D, F], "down" [n, F, D]} → rows [n, W] (a new array)."""
    n = ex["gate"].shape[0]
    return np.concatenate([np.asarray(ex[k], dtype).reshape(n, -1) for k in ("gate", "up", "down")], axis=1)


def unpack_rows(rows: np.ndarray, layout: RowLayout):
    """rows [n, W] → {"gate", "up", "down"} views (float) or a QuantExpertPool of views (quantized)."""
    n, D, F = rows.shape[0], layout.hidden, layout.ffn
    if layout.quant is None:
        return {"gate": rows[:, :D * F].reshape(n, D, F), "up": rows[:, D * F:2 * D * F].reshape(n, D, F),
                "down": rows[:, 2 * D * F:].reshape(n, F, D)}
    from ef_jax.quant.pool import QuantExpertPool
    fields, off = {}, 0
    raw = rows.view(np.uint8)
    for name, shape, dt in layout.quant:
        size = int(np.prod(shape)) * np.dtype(dt).itemsize
        fields[name] = np.ascontiguousarray(raw[:, off:off + size]).view(dt).reshape(n, *shape)
        off += size
    for m in ("gate", "up", "down"):
        fields.setdefault(f"{m}_offset", None)
    return QuantExpertPool(bits=layout.bits, **fields)


class ExpertRows:
    """Base of every reader: `layout`, `num_layers` (MoE layers) and `rows(j, start, stop)` → [n, W] (new array).
    `mapped` is True when rows can be read from the page cache on demand (host_memory="mapped")."""
    layout: RowLayout
    num_layers: int
    mapped = False

    def rows(self, j: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layout.nbytes

    def layer(self, j: int):
        """MoE layer j's experts as host arrays (float dict or QuantExpertPool): a transient copy, for tests."""
        return unpack_rows(self.rows(j), self.layout)


class ArrayRows(ExpertRows):
    """Rows from host arrays already in memory (random-weight models, tests): per MoE layer a float dict
    {"gate" [E, D, F], ...} or a QuantExpertPool of numpy arrays. The arrays stay alive here (they are the model's
    only host copy until the engine pins them)."""

    def __init__(self, layers: list):
        from ef_jax.quant.pool import QuantExpertPool
        self._layers = list(layers)
        first = self._layers[0]
        if isinstance(first, QuantExpertPool):
            self.layout = RowLayout.quantized(first)
        else:
            E, D, F = first["gate"].shape
            self.layout = RowLayout.floats(E, D, F, first["gate"].dtype)
        self.num_layers = len(self._layers)

    @property
    def layers(self) -> list:
        """The host arrays, per MoE layer (layers may share one bank: a benchmark's random model)."""
        return self._layers

    def rows(self, j: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        ex = self._layers[j]
        if self.layout.quant is None:
            return float_rows({k: v[start:stop] for k, v in ex.items()})
        from ef_jax.quant.pool import expert_bytes
        stop = self.layout.num_experts if stop is None else stop
        return np.stack([expert_bytes(ex, e) for e in range(start, stop)])


# ---- safetensors, read with plain file reads ---------------------------------------------------------------------
# Plain reads (not safe_open's mmap): every page a mapping touches counts in the process's RSS until it is unmapped,
# so reading a 28 GB checkpoint through one would look like 28 GB more of memory.

def read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's tensor table {name: {dtype, shape, data_offsets}} and where its data begins."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, absolute byte offset, shape and stored dtype."""
    path: str
    offset: int
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def read(self, fd_cache: dict | None = None) -> np.ndarray:
        """The tensor as a new numpy array (one pread)."""
        out = np.empty(self.shape, self.dtype)
        fd = _fd(self.path, fd_cache)
        try:
            got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], self.offset)
        finally:
            if fd_cache is None:
                os.close(fd)
        if got != self.nbytes:
            raise ValueError(f"{self.path} is truncated: read {got} of {self.nbytes} bytes at {self.offset}")
        return out


def _fd(path: str, cache: dict | None) -> int:
    if cache is None:
        return os.open(path, os.O_RDONLY)
    if path not in cache:
        cache[path] = os.open(path, os.O_RDONLY)
    return cache[path]


class CheckpointRows(ExpertRows):
    """Float rows read from a Hugging Face checkpoint's safetensors, expert by expert (transposed from torch's
    [out, in] to our [in, out], cast to the host dtype) straight into the layer's rows: no other copy of a layer.

    plans[j]: per-expert (gate, up, down) TensorRefs, or ("fused", gate_up ref [E, 2F, D], down ref [E, D, F])."""
    mapped = True  # rows are read on demand from the files (the page cache): host_memory="mapped" reads them here

    def __init__(self, plans: list, E: int, D: int, F: int, dtype):
        self.plans, self.num_layers = plans, len(plans)
        self.layout = RowLayout.floats(E, D, F, dtype)
        self._fds: dict[str, int] = {}

    def rows(self, j: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        L = self.layout
        stop = L.num_experts if stop is None else stop
        D, F = L.hidden, L.ffn
        out = np.empty((stop - start, L.width), L.dtype)
        plan = self.plans[j]
        if plan[0] == "fused":
            _, gate_up, down = plan
            both = gate_up.read(self._fds)[start:stop]        # [n, 2F, D]
            out[:, :D * F].reshape(-1, D, F)[:] = both[:, :F].transpose(0, 2, 1)
            out[:, D * F:2 * D * F].reshape(-1, D, F)[:] = both[:, F:].transpose(0, 2, 1)
            del both
            out[:, 2 * D * F:].reshape(-1, F, D)[:] = down.read(self._fds)[start:stop].transpose(0, 2, 1)
            return out
        for n, e in enumerate(range(start, stop)):
            for k, (ref, shape) in enumerate(zip(plan[e], ((D, F), (D, F), (F, D)))):
                seg = out[n, k * D * F:(k + 1) * D * F].reshape(shape)
                seg[:] = ref.read(self._fds).T   # [out, in] → [in, out], cast on assignment
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PackedRows(ExpertRows):
    """Rows of a packed file (the quantized-expert cache, ef_jax.quant.cache): MoE layer j is u8[E, B] at
    offsets[j]. The file is opened once and read with plain reads (it may be unlinked after: a temporary entry)."""
    mapped = True

    def __init__(self, path: str, offsets: list[int], layout: RowLayout):
        self.path, self.offsets, self.layout = path, list(offsets), layout
        self.num_layers = len(self.offsets)
        self._fds = {path: os.open(path, os.O_RDONLY)}

    def rows(self, j: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.layout.num_experts if stop is None else stop
        B = self.layout.bytes_per_expert
        ref = TensorRef(self.path, self.offsets[j] + start * B, (stop - start, B), np.dtype(np.uint8))
        return ref.read(self._fds)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
