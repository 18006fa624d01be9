"""Expert-slot SwiGLU FFN in Pallas: read each selected slot's weights straight from the pool, once.

y[t] = Σ_k weights[t, k] · down_s(silu(x[t]·gate_s) ⊙ (x[t]·up_s)),  s = slot_ids[t, k]   (f32 accumulation)

Axes: T tokens, K experts per token, S slots in the pool, D model width, F expert FFN width,
U distinct selected slots (≤ T·K), R rows of the slot-sorted (token, slot) pairs, bf/bd/bm block sizes.

Two regimes (chosen by T, see BlockSizes.decode_max_tokens):
- decode (T small, weight-bandwidth bound): the distinct slots are found once (`jnp.unique` with a static size
  T·K); program (u, f) reads slot u's gate/up columns f·bf… and down rows f·bf… exactly once and computes every
  token's share, weighted by the token's combine weight for that slot (0 when the token did not pick it).
  Partial outputs [U, F/bf, T, D] are summed outside (small next to the weights: T·D·4 bytes vs 3·D·bf·2).
- prefill (T large, compute bound): (token, slot) pairs are sorted by slot and each slot's group is padded to a
  multiple of bm rows, so every row tile belongs to one slot; two grouped matmuls (gate/up then down) run over
  (tile, block) grids, each tile reading its slot's weights from the pool.

The weight pools stay in their logical layout ([S, D, F], [S, F, D]); kernels index them with a slot id read from
a small int32 table inside the kernel (scalar prefetch is TPU-only). `expert_ffn_reference` is the plain-jnp
take+einsum formulation the kernels are tested against.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Defaults are data keyed by (device kind, D, F) — a tune mode of the benchmark can add rows."""
    block_f: int = 128           # F columns per program (decode) / per gate-up tile (prefill)
    block_d: int = 128           # D columns per down tile (prefill)
    block_m: int = 64            # rows per prefill tile (padded group granularity)
    decode_max_tokens: int = 16  # T ≤ this → decode kernel

    @classmethod
    def get_default(cls, device_kind: str | None = None, d: int | None = None, f: int | None = None) -> "BlockSizes":
        return _TUNED.get((device_kind, d, f), cls())


# (device kind, D, F) → tuned BlockSizes. Empty until a GPU run of benchmarks/bench_expert_ffn.py fills it.
_TUNED: dict[tuple, BlockSizes] = {}


def expert_ffn_reference(x, slot_ids, weights, w_gate, w_up, w_down):
    """Plain jnp: gather the K slots per token, SwiGLU, weighted sum. Same contract as expert_ffn."""
    g, u, d = w_gate[slot_ids], w_up[slot_ids], w_down[slot_ids]          # [T, K, D, F], [T, K, F, D]
    h = (jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, g, preferred_element_type=jnp.float32))
         * jnp.einsum("td,tkdf->tkf", x, u, preferred_element_type=jnp.float32))
    y = jnp.einsum("tkf,tkfd->tkd", h.astype(x.dtype), d, preferred_element_type=jnp.float32)
    return jnp.einsum("tkd,tk->td", y, weights.astype(jnp.float32)).astype(x.dtype)


def _largest_divisor_block(n: int, want: int) -> int:
    """The largest power-of-two block ≤ want dividing n (≥ 1)."""
    b = 1
    while b * 2 <= want and n % (b * 2) == 0:
        b *= 2
    return b


def _validate(x, slot_ids, weights, w_gate, w_up, w_down):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    T, D = x.shape
    if w_gate.ndim != 3 or w_gate.shape[1] != D:
        raise ValueError(f"w_gate must be [S, D={D}, F], got {w_gate.shape}")
    S, _, F = w_gate.shape
    if w_up.shape != (S, D, F):
        raise ValueError(f"w_up must have w_gate's shape {(S, D, F)}, got {w_up.shape}")
    if w_down.shape != (S, F, D):
        raise ValueError(f"w_down must be [S, F, D] = {(S, F, D)}, got {w_down.shape}")
    if slot_ids.ndim != 2 or slot_ids.shape[0] != T:
        raise ValueError(f"slot_ids must be [T={T}, K], got {slot_ids.shape}")
    if not jnp.issubdtype(slot_ids.dtype, jnp.integer):
        raise ValueError(f"slot_ids must be int32 slot indices, got dtype {slot_ids.dtype}")
    if weights.shape != slot_ids.shape:
        raise ValueError(f"weights must match slot_ids' shape {slot_ids.shape}, got {weights.shape}")
    for name, a in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if a.dtype != x.dtype:
            raise ValueError(f"{name} dtype {a.dtype} must equal x dtype {x.dtype} (cast the pool or x)")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported: use float32 or bfloat16")


# ---- decode --------------------------------------------------------------------------------------------------


def _decode_kernel(uniq_ref, cw_ref, x_ref, g_ref, u_ref, d_ref, o_ref, *, block_f: int):
    """Program (u, f): slot uniq[u], F block f. x [Tp, D]; cw [U, Tp] combine weight per (slot, token)."""
    u, f = pl.program_id(0), pl.program_id(1)
    slot = uniq_ref[u]
    cols = pl.ds(f * block_f, block_f)

    @pl.when(slot < 0)  # padding entry of the unique list: nothing to read
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(slot >= 0)
    def _():
        x = x_ref[...]
        s = jnp.maximum(slot, 0)
        gate = g_ref[s, :, cols]                                               # [D, bf]
        up = u_ref[s, :, cols]
        h = (jax.nn.silu(jnp.dot(x, gate, preferred_element_type=jnp.float32))
             * jnp.dot(x, up, preferred_element_type=jnp.float32))             # [Tp, bf]
        h = h * cw_ref[u, :][:, None]                                          # token weight for this slot
        down = d_ref[s, cols, :]                                               # [bf, D]
        o_ref[0, 0] = jnp.dot(h.astype(down.dtype), down, preferred_element_type=jnp.float32)


def _decode(x, slot_ids, weights, w_gate, w_up, w_down, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = w_gate.shape
    K = slot_ids.shape[1]
    Tp = max(16, -(-T // 16) * 16)  # dot operands need ≥ 16 rows on GPU
    bf = _largest_divisor_block(F, bs.block_f)
    U = T * K
    uniq = jnp.unique(slot_ids.reshape(-1), size=U, fill_value=-1).astype(jnp.int32)     # [U], -1 padded
    # cw[u, t] = Σ_k weights[t, k] · [slot_ids[t, k] == uniq[u]]  (duplicates of a slot in one row add up)
    hit = (slot_ids[None, :, :] == uniq[:, None, None]) & (uniq[:, None, None] >= 0)
    cw = jnp.einsum("utk,tk->ut", hit.astype(jnp.float32), weights.astype(jnp.float32))
    cw = jnp.pad(cw, ((0, 0), (0, Tp - T)))
    xp = jnp.pad(x, ((0, Tp - T), (0, 0)))
    full = lambda shape: pl.BlockSpec(shape, lambda u, f: (0,) * len(shape))
    partial = pl.pallas_call(
        functools.partial(_decode_kernel, block_f=bf),
        grid=(U, F // bf),
        in_specs=[full((U,)), full((U, Tp)), full((Tp, D)), full((S, D, F)), full((S, D, F)), full((S, F, D))],
        out_specs=pl.BlockSpec((1, 1, Tp, D), lambda u, f: (u, f, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((U, F // bf, Tp, D), jnp.float32),
        interpret=interpret,
    )(uniq, cw, xp, w_gate, w_up, w_down)
    return partial.sum(axis=(0, 1))[:T].astype(x.dtype)


# ---- prefill -------------------------------------------------------------------------------------------------


def _gate_up_kernel(tile_slot_ref, xs_ref, g_ref, u_ref, h_ref, *, block_f: int):
    """Program (i, f): rows of tile i (one slot) × F block f → h [bm, bf] = silu(x·gate) ⊙ (x·up)."""
    s = tile_slot_ref[pl.program_id(0)]
    cols = pl.ds(pl.program_id(1) * block_f, block_f)
    x = xs_ref[...]
    h = (jax.nn.silu(jnp.dot(x, g_ref[s, :, cols], preferred_element_type=jnp.float32))
         * jnp.dot(x, u_ref[s, :, cols], preferred_element_type=jnp.float32))
    h_ref[...] = h.astype(h_ref.dtype)


def _down_kernel(tile_slot_ref, h_ref, d_ref, y_ref, *, block_d: int):
    """Program (i, j): rows of tile i × D block j → y [bm, bd] = h · down[:, block]."""
    s = tile_slot_ref[pl.program_id(0)]
    cols = pl.ds(pl.program_id(1) * block_d, block_d)
    y_ref[...] = jnp.dot(h_ref[...], d_ref[s, :, cols], preferred_element_type=jnp.float32)


def _prefill(x, slot_ids, weights, w_gate, w_up, w_down, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = w_gate.shape
    K = slot_ids.shape[1]
    bm = bs.block_m
    bf, bd = _largest_divisor_block(F, bs.block_f), _largest_divisor_block(D, bs.block_d)
    pairs = T * K
    flat = slot_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=S)                                  # rows per slot
    padded = -(-sizes // bm) * bm                                          # each group padded to whole tiles
    starts = jnp.cumsum(padded) - padded                                   # padded row where slot s begins
    R = -(-pairs // bm) * bm + S * bm                                      # static bound on padded rows
    sorted_slot = flat[order]
    rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[sorted_slot]    # position inside its group
    row = starts[sorted_slot] + rank                                       # destination row of each pair
    xs = jnp.zeros((R, D), x.dtype).at[row].set(x[order // K])
    tiles = R // bm
    tile_start = jnp.arange(tiles) * bm
    # A tile's slot: the group whose padded range covers its first row (tiles past the end reuse the last slot
    # and hold zero rows, so they add nothing).
    tile_slot = jnp.clip(jnp.searchsorted(starts + padded, tile_start, side="right"), 0, S - 1).astype(jnp.int32)
    full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, block_f=bf),
        grid=(tiles, F // bf),
        in_specs=[full((tiles,)), pl.BlockSpec((bm, D), lambda i, j: (i, 0)), full((S, D, F)), full((S, D, F))],
        out_specs=pl.BlockSpec((bm, bf), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, F), x.dtype),
        interpret=interpret,
    )(tile_slot, xs, w_gate, w_up)
    y = pl.pallas_call(
        functools.partial(_down_kernel, block_d=bd),
        grid=(tiles, D // bd),
        in_specs=[full((tiles,)), pl.BlockSpec((bm, F), lambda i, j: (i, 0)), full((S, F, D))],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, D), jnp.float32),
        interpret=interpret,
    )(tile_slot, h, w_down)
    w_pair = weights.reshape(-1).astype(jnp.float32)[order]
    contrib = y[row] * w_pair[:, None]
    return jnp.zeros((T, D), jnp.float32).at[order // K].add(contrib).astype(x.dtype)


def expert_ffn(x, slot_ids, weights, w_gate, w_up, w_down, *, block_sizes: BlockSizes | None = None,
               interpret: bool = False, regime: str | None = None):
    """Σ_k weights[t,k] · SwiGLU expert in slot slot_ids[t,k], reading weights from the pools.

    Args:
      x: [T, D] float32 or bfloat16.
      slot_ids: int32 [T, K] slots (0 ≤ id < S).
      weights: [T, K] combine weights.
      w_gate, w_up: [S, D, F]; w_down: [S, F, D] — same dtype as x.
      block_sizes: tile sizes (default: BlockSizes.get_default for the device and shape).
      interpret: run the Pallas interpreter (CPU tests).
      regime: "decode" | "prefill" to override the choice by T.
    Returns: [T, D] in x's dtype (accumulated in float32).
    """
    _validate(x, slot_ids, weights, w_gate, w_up, w_down)
    if regime not in (None, "decode", "prefill"):
        raise ValueError(f"regime={regime!r} must be None, 'decode' or 'prefill'")
    kind = jax.devices()[0].device_kind
    bs = block_sizes or BlockSizes.get_default(kind, x.shape[1], w_gate.shape[2])
    regime = regime or ("decode" if x.shape[0] <= bs.decode_max_tokens else "prefill")
    fn = _decode if regime == "decode" else _prefill
    return fn(x, slot_ids.astype(jnp.int32), weights, w_gate, w_up, w_down, bs, interpret)
