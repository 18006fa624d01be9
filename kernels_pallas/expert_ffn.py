"""Expert-slot SwiGLU FFN in Pallas: read each selected slot's weights straight from the pool, once.

[route: slot_ids, weights] → [dedupe (decode) | group by slot (prefill)] → [Pallas SwiGLU over slots] → [combine]

y[t] = Σ_k weights[t, k] · down_s(silu(x[t]·gate_s) ⊙ (x[t]·up_s)),  s = slot_ids[t, k]   (f32 accumulation)

Axes: T tokens, K experts per token, S slots in the pool, D model width, F expert FFN width,
      U distinct-slot list (static length T·K, padded with the sentinel -1), P = T·K (token, slot) pairs,
      R rows of the slot-grouped pairs (each group padded to whole row tiles), bm/bf/bd block sizes.

Two regimes (chosen by T, see BlockSizes.decode_max_tokens; `regime=` overrides):
- decode (T small, weight-bandwidth bound): the distinct slots are found once on device (`jnp.unique` with the
  static size T·K, sentinel -1). Program (u, f) reads slot u's gate/up columns f·bf… and down rows f·bf… exactly
  once and computes every token's share, scaled by the token's combine weight for that slot (0 when the token did
  not pick it). Shares are combined as f32 partials [U, F/bf, Tp, D] summed by XLA (deterministic; Tp·D·4 bytes
  written and read back per program next to the 3·D·bf·2 weight bytes it reads: +1/3 traffic at Tp = 16, bf = 64,
  bf16) or, with BlockSizes.decode_combine="atomic", by Triton atomic adds into one L2-resident [Tp, D] buffer.
- prefill (T large, compute bound): pairs are sorted by slot and each slot's group is padded to a multiple of bm
  rows, so every row tile belongs to one slot; two grouped matmuls (gate/up, then down) run over (tile, block)
  grids, each tile reading its slot's weights from the pool. Tiles past the last group do no work.

GPU lowering: the kernels are written for the Pallas *Triton* lowering (forced with `pallas.triton.CompilerParams`;
the default Mosaic GPU lowering would stage whole pool blocks in shared memory). Everything a kernel loads is a
power-of-two tile with every dot dimension ≥ 16: the contraction dimension is walked with an in-kernel
`fori_loop`, and T is padded to a power of two ≥ 16 in decode. F and D must be multiples of 16 natively
(`pad_ffn` zero-pads F exactly at load time). Slot ids are read from a small int32 table inside the kernel
(scalar prefetch is TPU-only). The pools stay in their logical layout ([S, D, F], [S, F, D]).

`expert_ffn_reference` (take + einsum) is what the kernels are tested against; `expert_ffn_ragged_dot` is the
sort + `jax.lax.ragged_dot` baseline the benchmark compares with.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas import tuned_table


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and the regime threshold. Per-device/per-shape values are data (`_TUNED`), not code."""
    decode_block_f: int = 64     # F columns per decode program: small so T=1 still fills the SMs (U·F/bf programs)
    decode_block_d: int = 256    # D chunk of the decode contraction loop / of its output stores
    block_m: int = 64            # prefill rows per tile = padding granularity of each slot's group
    block_f: int = 128           # prefill F block (gate/up output columns, down contraction chunk)
    block_d: int = 128           # prefill D block (gate/up contraction chunk, down output columns)
    decode_max_tokens: int = 16  # T ≤ this → decode kernel
    # How decode programs combine their [Tp, D] shares: "partials" writes one f32 partial per program, summed by
    # XLA (deterministic; Tp·D·4 bytes written + read back per program, ≈ 1/3 of its weight bytes in bf16); "atomic" adds into one
    # L2-resident [Tp, D] buffer with Triton atomics (no round trip, but the f32 sum order varies run to run).
    decode_combine: str = "partials"
    decode_num_warps: int = 4    # Triton launch parameters: decode tiles are 16 rows, 4 warps suffice
    num_warps: int = 8           # prefill: two [bm, bf] f32 accumulators per program, 8 warps keep them in registers
    num_stages: int = 2          # software-pipeline depth of the contraction loops (shared memory bound)

    def __post_init__(self):
        for name in ("decode_block_f", "decode_block_d", "block_m", "block_f", "block_d"):
            v = getattr(self, name)
            if not _is_pow2(v) or v < 16:
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two ≥ 16 (Triton tile/dot constraint)")
        if self.decode_combine not in ("partials", "atomic"):
            raise ValueError(f"BlockSizes.decode_combine={self.decode_combine!r} must be 'partials' or 'atomic'")
        if self.decode_max_tokens < 0:
            raise ValueError(f"BlockSizes.decode_max_tokens={self.decode_max_tokens} must be ≥ 0")

    @classmethod
    def get_default(cls, device_kind: str | None = None, d: int | None = None, f: int | None = None) -> "BlockSizes":
        """The sizes tuned on this device kind for (D, F) (kernels_pallas/tuned.json), else the untuned defaults."""
        return _TUNED.get((device_kind, d, f)) or cls()


def tuned_block_sizes(path: str = tuned_table.DEFAULT_PATH) -> dict[tuple[str, int, int], BlockSizes]:
    """{(device kind, D, F): BlockSizes} read from a tuned table (kernels_pallas.tuned_table); {} without the file.
    A field BlockSizes does not have, or a value it refuses, is a ValueError naming the file and the entry."""
    out = {}
    for key, fields in tuned_table.read_table(path).items():
        try:
            out[key] = BlockSizes(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: the entry for (device_kind, D, F) = {key}: {e}") from None
    return out


# (device kind, D, F) → BlockSizes, written by `benchmarks/bench_expert_ffn.py --tune` on the device it names.
# Absent: the defaults above, first guesses for an H100 (bf16, Triton).
_TUNED: dict[tuple[str, int, int], BlockSizes] = tuned_block_sizes()


# ---- plain-jnp formulations ----------------------------------------------------------------------------------


def expert_ffn_reference(x, slot_ids, weights, w_gate, w_up, w_down):
    """Plain jnp take + einsum: gather the K slots per token, SwiGLU, weighted sum. Same contract as expert_ffn.

    Materialises [T, K, D, F] weight copies, so it is for tests and small T only.
    """
    g, u, d = w_gate[slot_ids], w_up[slot_ids], w_down[slot_ids]          # [T, K, D, F] ×2, [T, K, F, D]
    h = (jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, g, preferred_element_type=jnp.float32))
         * jnp.einsum("td,tkdf->tkf", x, u, preferred_element_type=jnp.float32))
    y = jnp.einsum("tkf,tkfd->tkd", h.astype(x.dtype), d, preferred_element_type=jnp.float32)
    return jnp.einsum("tkd,tk->td", y, weights.astype(jnp.float32)).astype(x.dtype)


def expert_ffn_ragged_dot(x, slot_ids, weights, w_gate, w_up, w_down):
    """The XLA baseline: sort (token, slot) pairs by slot, then three `jax.lax.ragged_dot` grouped matmuls."""
    T, K = slot_ids.shape
    flat = slot_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)                                 # [P] pairs grouped by slot
    xs = x[order // K]                                                     # [P, D]
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)  # [S]
    f32 = jnp.float32
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes, preferred_element_type=f32))
         * jax.lax.ragged_dot(xs, w_up, sizes, preferred_element_type=f32))
    y = jax.lax.ragged_dot(h.astype(x.dtype), w_down, sizes, preferred_element_type=f32)   # [P, D]
    y_pairs = jnp.zeros_like(y).at[order].set(y).reshape(T, K, -1)         # back to (token, k) order
    return jnp.einsum("tkd,tk->td", y_pairs, weights.astype(f32)).astype(x.dtype)


def pad_ffn(w_gate, w_up, w_down, multiple: int = 128):
    """Zero-pads the F axis of the pools to a multiple of `multiple`, once at load time.

    Exact: a padded column gives silu(0)·0 = 0, and the padded down rows are 0. Use it when F is not a multiple of
    16 (the native kernel refuses such F) or to make F divisible by a larger block.
    """
    pad = -w_gate.shape[2] % multiple
    if pad == 0:
        return w_gate, w_up, w_down
    cols = ((0, 0), (0, 0), (0, pad))
    return jnp.pad(w_gate, cols), jnp.pad(w_up, cols), jnp.pad(w_down, ((0, 0), (0, pad), (0, 0)))


# ---- validation ----------------------------------------------------------------------------------------------


def _validate(x, slot_ids, weights, w_gate, w_up, w_down):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    T, D = x.shape
    if T == 0:
        raise ValueError("x has T=0 tokens: skip the call instead")
    if w_gate.ndim != 3 or w_gate.shape[1] != D:
        raise ValueError(f"w_gate must be [S, D={D}, F] (D from x), got {w_gate.shape}")
    S, _, F = w_gate.shape
    if w_up.shape != (S, D, F):
        raise ValueError(f"w_up must have w_gate's shape [S, D, F] = {(S, D, F)}, got {w_up.shape}")
    if w_down.shape != (S, F, D):
        raise ValueError(f"w_down must be [S, F, D] = {(S, F, D)} (transpose of w_gate's last two axes), "
                         f"got {w_down.shape}")
    if slot_ids.ndim != 2 or slot_ids.shape[0] != T:
        raise ValueError(f"slot_ids must be [T={T}, K], got {slot_ids.shape}")
    if slot_ids.shape[1] == 0:
        raise ValueError("slot_ids has K=0 experts per token: K must be ≥ 1")
    if slot_ids.dtype != jnp.int32:
        raise ValueError(f"slot_ids must be int32 slot indices, got dtype {slot_ids.dtype} "
                         "(cast with slot_ids.astype(jnp.int32))")
    if weights.shape != slot_ids.shape:
        raise ValueError(f"weights must match slot_ids' shape [T, K] = {slot_ids.shape}, got {weights.shape}")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"weights must be floating point combine weights, got dtype {weights.dtype}")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported: use float32 or bfloat16")
    for name, a in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if a.dtype != x.dtype:
            raise ValueError(f"{name} dtype {a.dtype} must equal x dtype {x.dtype} (cast the pool or x)")


def _block(n: int, want: int, axis: str, interpret: bool) -> int:
    """The largest power-of-two block ≤ want dividing n; natively it must be ≥ 16 (Triton dot minimum)."""
    b = 1
    while b * 2 <= want and n % (b * 2) == 0:
        b *= 2
    if b < 16 and not interpret:
        fix = "zero-pad F with kernels_pallas.pad_ffn" if axis == "F" else "pad the model width"
        raise ValueError(f"{axis}={n} must be a multiple of 16 for the native kernel: {fix}")
    return b


def _triton_params(num_warps: int, num_stages: int):
    # Forces the Triton lowering on NVIDIA (the default Mosaic GPU lowering wants whole blocks in SMEM).
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _whole(shape):
    """A block covering the whole array: the kernel indexes it itself (slot ids are data, not grid indices)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# ---- decode --------------------------------------------------------------------------------------------------


def _decode_kernel(uniq_ref, cw_ref, x_ref, g_ref, u_ref, d_ref, *refs, bf: int, bd: int, atomic: bool):
    """Program (u, f): slot uniq[u], F block f, every (padded) token.

    Adds its [Tp, D] f32 share into o (atomic: o is the [Tp, D] output) or writes it as partial o[0, 0] (o is
    [1, 1, Tp, D]). refs = (zeros aliased to o, o) when atomic, else (o,).
    """
    o_ref = refs[-1]
    u, f = pl.program_id(0), pl.program_id(1)
    slot = uniq_ref[u]
    tp, D = x_ref.shape
    cols = pl.ds(pl.multiple_of(f * bf, bf), bf)

    def store(out, val):  # val [Tp, bd] f32 into D columns `out`
        if atomic:
            pl_triton.atomic_add(o_ref, (slice(None), out), val)
        else:
            o_ref[0, 0, :, out] = val

    @pl.when(slot < 0)  # sentinel entry of the distinct-slot list: nothing to read
    def _():
        if not atomic:
            @pl.loop(0, D // bd)  # in D chunks: one [Tp, D] tile would not fit in registers
            def _(j):
                store(pl.ds(pl.multiple_of(j * bd, bd), bd), jnp.zeros((tp, bd), jnp.float32))

    @pl.when(slot >= 0)
    def _():
        def gate_up(j, acc):  # walk D in chunks so each loaded tile stays small
            rows = pl.ds(pl.multiple_of(j * bd, bd), bd)
            xj = x_ref[:, rows]                                                # [Tp, bd]
            return (acc[0] + jnp.dot(xj, g_ref[slot, rows, cols], preferred_element_type=jnp.float32),
                    acc[1] + jnp.dot(xj, u_ref[slot, rows, cols], preferred_element_type=jnp.float32))

        zero = jnp.zeros((tp, bf), jnp.float32)
        a_g, a_u = jax.lax.fori_loop(0, D // bd, gate_up, (zero, zero))
        h = jax.nn.silu(a_g) * a_u * cw_ref[u, :][:, None]                     # [Tp, bf], 0 for other tokens
        h = h.astype(d_ref.dtype)

        @pl.loop(0, D // bd)
        def _(j):
            out = pl.ds(pl.multiple_of(j * bd, bd), bd)
            store(out, jnp.dot(h, d_ref[slot, cols, out], preferred_element_type=jnp.float32))


def _decode(x, slot_ids, weights, w_gate, w_up, w_down, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = w_gate.shape
    K = slot_ids.shape[1]
    tp = max(16, 1 << (T - 1).bit_length())  # power of two ≥ 16: Triton tile and dot minimums
    bf, bd = _block(F, bs.decode_block_f, "F", interpret), _block(D, bs.decode_block_d, "D", interpret)
    U = T * K  # static bound on distinct slots; the tail is the sentinel -1
    uniq = jnp.unique(slot_ids.reshape(-1), size=U, fill_value=-1).astype(jnp.int32)      # i32[U]
    # cw[u, t] = Σ_k weights[t, k] · [slot_ids[t, k] == uniq[u]]: a token naming a slot twice gets both weights.
    hit = (slot_ids[None, :, :] == uniq[:, None, None]) & (uniq[:, None, None] >= 0)      # bool[U, T, K]
    cw = jnp.einsum("utk,tk->ut", hit.astype(jnp.float32), weights.astype(jnp.float32))
    cw = jnp.pad(cw, ((0, 0), (0, tp - T)))                                                 # f32[U, Tp]
    xp = jnp.pad(x, ((0, tp - T), (0, 0)))                                                  # [Tp, D]
    atomic = bs.decode_combine == "atomic"
    in_specs = [_whole((U,)), _whole((U, tp)), _whole((tp, D)),
                _whole((S, D, F)), _whole((S, D, F)), _whole((S, F, D))]
    operands = [uniq, cw, xp, w_gate, w_up, w_down]
    if atomic:  # every program adds into one [Tp, D] buffer, zeroed by aliasing a zeros input to it
        in_specs.append(_whole((tp, D)))
        operands.append(jnp.zeros((tp, D), jnp.float32))
        out_spec, out_shape = _whole((tp, D)), jax.ShapeDtypeStruct((tp, D), jnp.float32)
    else:
        out_spec = pl.BlockSpec((1, 1, tp, D), lambda u, f: (u, f, 0, 0))
        out_shape = jax.ShapeDtypeStruct((U, F // bf, tp, D), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_decode_kernel, bf=bf, bd=bd, atomic=atomic),
        grid=(U, F // bf),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        input_output_aliases={len(operands) - 1: 0} if atomic else {},
        compiler_params=None if interpret else _triton_params(bs.decode_num_warps, bs.num_stages),
        interpret=interpret,
    )(*operands)
    return (out if atomic else out.sum(axis=(0, 1)))[:T].astype(x.dtype)


# ---- prefill -------------------------------------------------------------------------------------------------


def _gate_up_kernel(tile_slot_ref, xs_ref, g_ref, u_ref, h_ref, *, bf: int, bd: int):
    """Program (i, f): rows of tile i (one slot) × F block f → h [bm, bf] = silu(x·gate) ⊙ (x·up)."""
    s = tile_slot_ref[pl.program_id(0)]
    bm, D = xs_ref.shape
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bf, bf), bf)

    @pl.when(s < 0)  # tile past the last group: all-zero rows that nothing reads
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)

    @pl.when(s >= 0)
    def _():
        def body(j, acc):
            rows = pl.ds(pl.multiple_of(j * bd, bd), bd)
            xj = xs_ref[:, rows]                                                # [bm, bd]
            return (acc[0] + jnp.dot(xj, g_ref[s, rows, cols], preferred_element_type=jnp.float32),
                    acc[1] + jnp.dot(xj, u_ref[s, rows, cols], preferred_element_type=jnp.float32))

        zero = jnp.zeros((bm, bf), jnp.float32)
        a_g, a_u = jax.lax.fori_loop(0, D // bd, body, (zero, zero))
        h_ref[...] = (jax.nn.silu(a_g) * a_u).astype(h_ref.dtype)


def _down_kernel(tile_slot_ref, h_ref, d_ref, y_ref, *, bf: int, bd: int):
    """Program (i, j): rows of tile i × D block j → y [bm, bd] = h · down[:, block] (f32)."""
    s = tile_slot_ref[pl.program_id(0)]
    bm, F = h_ref.shape
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)

    @pl.when(s < 0)
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)

    @pl.when(s >= 0)
    def _():
        def body(k, acc):
            ks = pl.ds(pl.multiple_of(k * bf, bf), bf)
            return acc + jnp.dot(h_ref[:, ks], d_ref[s, ks, cols], preferred_element_type=jnp.float32)

        y_ref[...] = jax.lax.fori_loop(0, F // bf, body, jnp.zeros((bm, bd), jnp.float32))


def _group_rows(slot_ids, S: int, bm: int):
    """Lays the (token, slot) pairs out slot by slot, each group padded to whole bm-row tiles.

    Returns (row i32[P]: padded row of pair p in (token, k) order, tile_slot i32[R/bm]: slot of each tile, -1 past
    the last group, R: static row count).
    """
    P = slot_ids.size
    flat = slot_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)                                 # [P] pair ids grouped by slot
    sizes = jnp.bincount(flat, length=S)                                   # [S] rows per slot
    padded = -(-sizes // bm) * bm
    starts = jnp.cumsum(padded) - padded                                   # [S] padded row where slot s begins
    sorted_slot = flat[order]
    rank = jnp.arange(P) - (jnp.cumsum(sizes) - sizes)[sorted_slot]        # position inside its group
    row = jnp.zeros((P,), jnp.int32).at[order].set((starts[sorted_slot] + rank).astype(jnp.int32))
    # At most min(S, P) groups are non-empty and each wastes < bm rows: the static bound on padded rows.
    R = -(-(P + min(S, P) * (bm - 1)) // bm) * bm
    tile_start = jnp.arange(R // bm) * bm
    tile_slot = jnp.searchsorted(starts + padded, tile_start, side="right")
    tile_slot = jnp.where(tile_start < padded.sum(), tile_slot, -1).astype(jnp.int32)
    return row, tile_slot, R


def _prefill(x, slot_ids, weights, w_gate, w_up, w_down, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = w_gate.shape
    K = slot_ids.shape[1]
    bm = bs.block_m
    bf, bd = _block(F, bs.block_f, "F", interpret), _block(D, bs.block_d, "D", interpret)
    row, tile_slot, R = _group_rows(slot_ids, S, bm)
    tiles = R // bm
    token = jnp.arange(T * K, dtype=jnp.int32) // K
    xs = jnp.zeros((R, D), x.dtype).at[row].set(x[token])                  # [R, D] slot-grouped, zero padded
    params = None if interpret else _triton_params(bs.num_warps, bs.num_stages)
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, bf=bf, bd=bd),
        grid=(tiles, F // bf),
        in_specs=[_whole((tiles,)), pl.BlockSpec((bm, D), lambda i, j: (i, 0)),
                  _whole((S, D, F)), _whole((S, D, F))],
        out_specs=pl.BlockSpec((bm, bf), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, F), x.dtype),
        compiler_params=params,
        interpret=interpret,
    )(tile_slot, xs, w_gate, w_up)
    y = pl.pallas_call(
        functools.partial(_down_kernel, bf=bf, bd=bd),
        grid=(tiles, D // bd),
        in_specs=[_whole((tiles,)), pl.BlockSpec((bm, F), lambda i, j: (i, 0)), _whole((S, F, D))],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, D), jnp.float32),
        compiler_params=params,
        interpret=interpret,
    )(tile_slot, h, w_down)
    # Gather (not scatter) each pair's row back into (token, k) order, then combine.
    return jnp.einsum("tkd,tk->td", y[row].reshape(T, K, D), weights.astype(jnp.float32)).astype(x.dtype)


# ---- public wrapper ------------------------------------------------------------------------------------------


def expert_ffn(x, slot_ids, weights, w_gate, w_up, w_down, *, block_sizes: BlockSizes | None = None,
               interpret: bool = False, regime: str | None = None):
    """Σ_k weights[t,k] · SwiGLU expert in slot slot_ids[t,k], reading the experts' weights from the pools.

    Args:
      x: [T, D] float32 or bfloat16 tokens.
      slot_ids: i32[T, K] pool slots (0 ≤ id < S; a token may name a slot twice, the weights then add).
      weights: f[T, K] combine weights.
      w_gate, w_up: [S, D, F]; w_down: [S, F, D] — the pools, same dtype as x.
      block_sizes: tile sizes (default: BlockSizes.get_default for the device kind and shape).
      interpret: run the Pallas interpreter (CPU tests); otherwise lower with Triton on an NVIDIA GPU.
      regime: "decode" | "prefill" to override the choice by T (BlockSizes.decode_max_tokens).
    Returns:
      [T, D] in x's dtype, accumulated in float32.
    """
    _validate(x, slot_ids, weights, w_gate, w_up, w_down)
    if regime not in (None, "decode", "prefill"):
        raise ValueError(f"regime={regime!r} must be None (choose by T), 'decode' or 'prefill'")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels_pallas.BlockSizes, got {type(block_sizes).__name__}")
    bs = block_sizes or BlockSizes.get_default(jax.devices()[0].device_kind, x.shape[1], w_gate.shape[2])
    regime = regime or ("decode" if x.shape[0] <= bs.decode_max_tokens else "prefill")
    fn = _decode if regime == "decode" else _prefill
    return fn(x, slot_ids, weights, w_gate, w_up, w_down, bs, interpret)
