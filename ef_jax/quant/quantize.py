"""Group-wise int8 / int4 quantization of expert matrices (host numpy, at load or convert time).

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

import numpy as np

BITS = {"int8": 8, "int4": 4}
METHODS = ("rtn", "hqq")
DEFAULT_GROUP_SIZE = 64
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


# ---- quantize / dequantize (numpy reference) ------------------------------------------------------------------


def _grouped(w: np.ndarray, g: int) -> np.ndarray:
    *lead, rows, cols = w.shape
    return w.astype(np.float32).reshape(*lead, rows // g, g, cols)     # [..., I/G, G, O]


def _as_param(x: np.ndarray) -> np.ndarray:
    """f32 → the stored float16, kept finite and (for scales) non-zero."""
    return np.clip(x, -65504.0, 65504.0).astype(PARAM_DTYPE)


def _codes(wg: np.ndarray, s: np.ndarray, m: np.ndarray | None, bits: int) -> np.ndarray:
    """Round against the stored parameters. wg [..., I/G, G, O], s/m [..., I/G, 1, O] (float32 of float16)."""
    top = (1 << bits) - 1
    if m is None:
        return np.clip(np.rint(wg / s) + (1 << (bits - 1)), 1, top).astype(np.uint8)
    return np.clip(np.rint((wg - m) / s), 0, top).astype(np.uint8)


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Generalised soft threshold: the proximal step of |x|^p / beta (p < 1)."""
    a = np.abs(x)
    return np.sign(x) * np.maximum(a - np.power(np.maximum(a, 1e-8), p - 1) / beta, 0.0)


def _hqq_offset(y: np.ndarray, z: np.ndarray, top: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                kappa: float = 1.01) -> np.ndarray:
    """Refits the zero point z (in units of the scale: w/s ≈ u − z) of each group. y = w/s [..., I/G, G, O],
    z [..., I/G, 1, O]. Half-quadratic splitting: an auxiliary error e takes the ℓp-shrunk residual, then z is the
    closed-form least-squares fit of the rest. Each group keeps the z with its lowest mean |error| seen (the RTN
    start included), so the fit is never worse than round-to-nearest on that measure."""
    def error(z):  # [..., I/G, 1, O]
        return np.mean(np.abs(y - (np.clip(np.rint(y + z), 0, top) - z)), axis=-2, keepdims=True)

    best_z, best = z, error(z)
    for _ in range(iters):
        u = np.clip(np.rint(y + z), 0, top)
        e = _shrink_lp(y - (u - z), beta, p)
        z = np.mean(u - (y - e), axis=-2, keepdims=True)
        err = error(z)
        better = err < best
        best_z, best = np.where(better, z, best_z), np.where(better, err, best)
        beta *= kappa
    return best_z


def quantize(w: np.ndarray, spec: QuantSpec) -> QTensor:
    """w f[..., I, O] → QTensor, grouped along I (axis −2)."""
    rows = w.shape[-2]
    g = spec.group_for(rows)
    wg = _grouped(w, g)
    bits, top = spec.bits, (1 << spec.bits) - 1
    if spec.symmetric:
        amax = np.abs(wg).max(axis=-2, keepdims=True)
        s = _as_param(np.maximum(amax / ((1 << (bits - 1)) - 1), 1e-7)).astype(np.float32)
        m = None
    else:
        lo, hi = wg.min(axis=-2, keepdims=True), wg.max(axis=-2, keepdims=True)
        s = _as_param(np.maximum((hi - lo) / top, 1e-7)).astype(np.float32)
        if spec.method == "hqq":
            z = _hqq_offset(wg / s, -lo / s, top)
            m = _as_param(-z * s).astype(np.float32)
        else:
            m = _as_param(lo).astype(np.float32)
    u = _codes(wg, s, m, bits).reshape(w.shape)
    codes = pack_int4(u) if bits == 4 else u
    squeeze = lambda a: None if a is None else _as_param(a[..., 0, :])
    return QTensor(codes=codes, scale=squeeze(s), offset=squeeze(m), bits=bits)


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
FLOAT_EXPERT_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}


def spec_for(expert_dtype, group_size: int | None, dtype: str) -> QuantSpec | None:
    """ef_jax.load's expert_dtype= / group_size= → QuantSpec, or None for unquantized experts.

    expert_dtype: None or a float name equal to the model dtype (no quantization), "int8" | "int4", or a QuantSpec.
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
    method, symmetric = DEFAULT_METHOD[bits]
    return QuantSpec(bits=bits, group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size,
                     method=method, symmetric=symmetric)
