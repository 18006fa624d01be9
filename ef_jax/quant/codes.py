"""Group-wise int8 / int4 quantization of expert matrices (at load or convert time; results in host numpy).

[w f[..., I, O]] → groups of G rows along I (the contraction axis) → scale (+ offset) per (group, column)
   → codes u8 → int4: two codes per byte (planar halves of I) → QTensor

Axes: I the matrix's input (contraction) axis, O its output axis, G rows per group, I/G groups.

Dequantization (what the expert FFN computes on the device, `ef_jax.quant.pool.dequantize`):
  symmetric:  w ≈ (u − 2^(b−1)) · s          u ∈ [1, 2^b − 1]      (codes centred on 2^(b−1))
  asymmetric: w ≈ u · s + m                  u ∈ [0, 2^b − 1]      (m: the group's offset)
s and m are float16 (as GPTQ/AWQ/llama.cpp store them): 2 bytes each per group and column. Codes are always
rounded against the *stored* float16 s and m, so rounding the parameters costs no extra error beyond clipping.

int4 packing ("planar"): byte row r < I/2 holds row r in its low nibble and row r + I/2 in its high nibble,
so unpacking is two shifts and a concatenation (no interleave), and a kernel reading a row block of the packed
matrix gets two row blocks of the matrix, each inside whole groups when G divides I/2.

Methods:
  "rtn": round to nearest against the group's min/max (asymmetric) or absmax (symmetric) range.
  "hqq": HQQ-style (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023):
         keeps RTN's scale and refits the offset by half-quadratic splitting of an ℓp (p < 1) error, which lets a
         few outlier weights err more so that the bulk errs less. Asymmetric only (it fits the offset).
The measured choice between them is in README ("Quantized experts").
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.quant.formats import BITS, DEFAULT_GROUP_SIZE, METHODS  # noqa: F401 (re-exported)

PARAM_DTYPE = np.dtype(np.float16)  # dtype of the stored scales and offsets


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How expert matrices are quantized. group_size is the rows per group along the contraction axis; a
    matrix whose input axis is shorter uses its whole axis as one group (tiny models)."""
    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    method: str = "hqq"
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r} must be 8 (int8) or 4 (int4)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int (rows per group), e.g. 64")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if self.method == "hqq" and self.symmetric:
            raise ValueError("method='hqq' fits the offset of an asymmetric range: use symmetric=False, "
                             "or method='rtn' for symmetric quantization")

    @property
    def dtype_name(self) -> str:
        return f"int{self.bits}"

    def group_for(self, rows: int) -> int:
        """Rows per group for a matrix with `rows` input rows; ValueError naming the fix if it does not divide."""
        g = min(self.group_size, rows)
        if rows % g:
            raise ValueError(f"group_size={self.group_size} does not divide an expert matrix's input axis of {rows} "
                             f"rows: choose a group size that divides {rows} (e.g. {_divisor_near(rows, g)})")
        if self.bits == 4 and rows % 2:
            raise ValueError(f"int4 packs two rows per byte: the input axis ({rows} rows) must be even")
        return g


def _divisor_near(n: int, g: int) -> int:
    return max(d for d in range(1, g + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class QTensor:
    """One quantized matrix stack. Leading axes (e.g. E experts) are kept as they are."""
    codes: np.ndarray          # u8[..., I·b/8, O]   (int4: planar-packed, see module docstring)
    scale: np.ndarray          # f16[..., I/G, O]
    offset: np.ndarray | None  # f16[..., I/G, O]; None when symmetric
    bits: int


# ---- packing ---------------------------------------------------------------------------------------------------


def pack_int4(u: np.ndarray) -> np.ndarray:
    """u8[..., I, O] codes in [0, 15] → u8[..., I/2, O]: low nibble row r, high nibble row r + I/2."""
    half = u.shape[-2] // 2
    return (u[..., :half, :] | (u[..., half:, :] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4: u8[..., I/2, O] → u8[..., I, O]."""
    return np.concatenate([p & 0xF, p >> 4], axis=-2)


# ---- quantize (one jitted XLA computation per chunk of experts) ------------------------------------------------
# The fit is elementwise work over every weight (HQQ: 20 passes), too slow in numpy for real models (measured
# 8.3 s per million weights for int4 HQQ on the 2-core CPU): jitted, XLA fuses each pass, and on a GPU it runs there.

_CHUNK_WEIGHTS = 1 << 25  # weights per jitted call (bounds the temporaries at a few hundred MB)


def _as_param(x: jax.Array) -> jax.Array:
    """f32 → the stored float16 (kept finite), returned as float32 so codes round against what is stored."""
    return jnp.clip(x, -65504.0, 65504.0).astype(jnp.float16).astype(jnp.float32)


def _shrink_lp(x: jax.Array, beta, p: float) -> jax.Array:
    """Generalised soft threshold: the proximal step of |x|^p / beta (p < 1)."""
    a = jnp.abs(x)
    return jnp.sign(x) * jnp.maximum(a - jnp.power(jnp.maximum(a, 1e-8), p - 1) / beta, 0.0)


def _hqq_offset(y: jax.Array, z: jax.Array, top: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                kappa: float = 1.01) -> jax.Array:
    """Refits the zero point z (in units of the scale: w/s ≈ u − z) of each group. y = w/s [..., I/G, G, O],
    z [..., I/G, 1, O]. Half-quadratic splitting: an auxiliary error e takes the ℓp-shrunk residual, then z is the
    closed-form least-squares fit of the rest. Each group keeps the z with its lowest mean |error| seen (the RTN
    start included), so the fit is never worse than round-to-nearest on that measure."""
    def error(z):  # [..., I/G, 1, O]
        return jnp.mean(jnp.abs(y - (jnp.clip(jnp.rint(y + z), 0, top) - z)), axis=-2, keepdims=True)

    def step(_, carry):
        z, best_z, best, beta = carry
        u = jnp.clip(jnp.rint(y + z), 0, top)
        e = _shrink_lp(y - (u - z), beta, p)
        z = jnp.mean(u - (y - e), axis=-2, keepdims=True)
        err = error(z)
        better = err < best
        return z, jnp.where(better, z, best_z), jnp.where(better, err, best), beta * kappa

    _, best_z, _, _ = jax.lax.fori_loop(0, iters, step, (z, z, error(z), jnp.float32(beta)))
    return best_z


@functools.partial(jax.jit, static_argnames=("g", "bits", "method", "symmetric"))
def _quantize_chunk(w: jax.Array, g: int, bits: int, method: str, symmetric: bool):
    """w f[n, I, O] → (codes u8[n, I, O] unpacked, scale f16[n, I/G, O], offset f16[n, I/G, O] | None)."""
    n, rows, cols = w.shape
    wg = w.astype(jnp.float32).reshape(n, rows // g, g, cols)                  # [n, I/G, G, O]
    top = (1 << bits) - 1
    if symmetric:
        amax = jnp.abs(wg).max(axis=-2, keepdims=True)
        s = _as_param(jnp.maximum(amax / ((1 << (bits - 1)) - 1), 1e-7))
        u = jnp.clip(jnp.rint(wg / s) + (1 << (bits - 1)), 1, top)
        m = None
    else:
        lo, hi = wg.min(axis=-2, keepdims=True), wg.max(axis=-2, keepdims=True)
        s = _as_param(jnp.maximum((hi - lo) / top, 1e-7))
        m = _as_param(-_hqq_offset(wg / s, -lo / s, top) * s) if method == "hqq" else _as_param(lo)
        u = jnp.clip(jnp.rint((wg - m) / s), 0, top)
    f16 = lambda a: None if a is None else a[..., 0, :].astype(jnp.float16)
    return u.astype(jnp.uint8).reshape(n, rows, cols), f16(s), f16(m)


def quantize(w: np.ndarray, spec: QuantSpec) -> QTensor:
    """w f[..., I, O] → QTensor (host numpy), grouped along I (axis −2)."""
    *lead, rows, cols = w.shape
    g = spec.group_for(rows)
    flat = np.asarray(w).reshape(-1, rows, cols)
    step = max(1, _CHUNK_WEIGHTS // (rows * cols))
    parts = [jax.device_get(_quantize_chunk(flat[i:i + step], g, spec.bits, spec.method, spec.symmetric))
             for i in range(0, flat.shape[0], step)]
    join = lambda k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts]).reshape(
        *lead, *parts[0][k].shape[1:])
    u, scale, offset = join(0), join(1), join(2)
    codes = pack_int4(u) if spec.bits == 4 else u
    return QTensor(codes=np.ascontiguousarray(codes), scale=scale, offset=offset, bits=spec.bits)


def dequantize_reference(q: QTensor, dtype=np.float32) -> np.ndarray:
    """QTensor → f[..., I, O] in plain numpy (the reference the device dequantization is tested against)."""
    u = unpack_int4(q.codes) if q.bits == 4 else q.codes
    *lead, rows, cols = u.shape
    groups = q.scale.shape[-2]
    ug = u.astype(np.float32).reshape(*lead, groups, rows // groups, cols)
    s = q.scale.astype(np.float32)[..., :, None, :]
    if q.offset is None:
        w = (ug - (1 << (q.bits - 1))) * s
    else:
        w = ug * s + q.offset.astype(np.float32)[..., :, None, :]
    return w.reshape(u.shape).astype(dtype)


def quantized_nbytes(rows: int, cols: int, spec: QuantSpec) -> int:
    """Bytes of one quantized [rows, cols] matrix: codes + scales (+ offsets)."""
    groups = rows // spec.group_for(rows)
    params = (1 if spec.symmetric else 2) * groups * cols * PARAM_DTYPE.itemsize
    return rows * cols * spec.bits // 8 + params


# Method per dtype, chosen by the perplexity sweep in README ("Quantized experts", benchmarks/bench_quant.py).
DEFAULT_METHOD = {8: ("rtn", True), 4: ("hqq", False)}  # bits → (method, symmetric)
# At load (ef_jax.load(expert_dtype=...)): round-to-nearest for both, one vectorised pass (HQQ's 20-pass fit took
# 100-170 s per DeepSeek-V2-Lite MoE layer on 2 CPU cores); int4 asymmetric RTN costs +0.83 % perplexity vs HQQ's
# +0.67 % at group 64 (README, "Quantized experts"). `ef-jax convert` keeps DEFAULT_METHOD.
LOAD_METHOD = {8: ("rtn", True), 4: ("rtn", False)}
FLOAT_EXPERT_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}


def spec_for(expert_dtype, group_size: int | None, dtype: str, at_load: bool = False) -> QuantSpec | None:
    """ef_jax.load's expert_dtype= / group_size= → QuantSpec, or None for unquantized experts.

    expert_dtype: None or a float name equal to the model dtype (no quantization), "int8" | "int4", or a QuantSpec.
    at_load: the method for a dtype name is LOAD_METHOD's (fast round-to-nearest) instead of DEFAULT_METHOD's
    (what `ef-jax convert` fits once, offline).
    """
    if isinstance(expert_dtype, QuantSpec):
        if group_size is not None and group_size != expert_dtype.group_size:
            raise ValueError(f"group_size={group_size} contradicts the QuantSpec's group_size="
                             f"{expert_dtype.group_size}: pass one of them")
        return expert_dtype
    if expert_dtype is None or expert_dtype in FLOAT_EXPERT_DTYPES:
        if expert_dtype is not None and FLOAT_EXPERT_DTYPES[expert_dtype] != dtype:
            raise ValueError(f"expert_dtype={expert_dtype!r} with dtype={dtype!r}: float experts use the model's "
                             f"dtype; pass dtype={FLOAT_EXPERT_DTYPES[expert_dtype]!r}, or expert_dtype='int8'/'int4'")
        if group_size is not None:
            raise ValueError(f"group_size={group_size} only applies to quantized experts (expert_dtype='int8'/'int4')")
        return None
    if expert_dtype not in BITS:
        raise ValueError(f"expert_dtype={expert_dtype!r} is not supported; use 'bf16' (no quantization), "
                         f"'int8' or 'int4'")
    bits = BITS[expert_dtype]
    method, symmetric = (LOAD_METHOD if at_load else DEFAULT_METHOD)[bits]
    return QuantSpec(bits=bits, group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size,
                     method=method, symmetric=symmetric)
