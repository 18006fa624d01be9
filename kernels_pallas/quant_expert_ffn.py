"""Expert-slot SwiGLU FFN over a *quantized* pool in Pallas: int8/int4 codes dequantized tile by tile in the kernel.

[route: slot_ids, weights] → [dedupe (decode) | group by slot (prefill)] → [Pallas: load code tile → unpack nibbles
→ × scale (+ offset) → dot, f32 accumulation] → [combine]

y[t] = Σ_k weights[t, k] · down_s(silu(x[t]·gate_s) ⊙ (x[t]·up_s)),  s = slot_ids[t, k], every matrix dequantized
       as ef_jax.quant: w = (u − 2^(b−1))·s (symmetric) or u·s + m (asymmetric), groups of G rows along its input axis

Axes: T tokens, K experts per token, S slots, D model width, F expert FFN width, G rows per group of gate/up (along
D), Gf of down (along F), b bits, U distinct slots (static T·K, sentinel −1), R slot-grouped padded rows.

Same two regimes and the same host-side layout as kernels_pallas.expert_ffn (it reuses its helpers); what changes
is how a weight tile is read. The contraction walks whole quantization groups, so every tile has one scale row:
  - gate/up: the D loop steps G rows (int8) or G packed rows = two G-row blocks, at r and D/2 + r (int4 planar
    packing), each multiplied by its own group's scale row;
  - down: in decode the F block is exactly one down group (bf = Gf), so the block's down rows have one scale row,
    and for int4 the block's nibble (low: rows < F/2, high: rows ≥ F/2) is chosen by the program's F index; in
    prefill the F loop steps Gf (packed) rows as gate/up's D loop does.
Native (Triton) constraints: G, Gf powers of two ≥ 16; int4 needs D % 2G == 0 and F % 2Gf == 0. Interpret mode
takes any group sizes that divide the axes.

`quant_expert_ffn_reference` (plain jnp: dequantize the gathered slots, then take + einsum) is what the kernels
are tested against; it dequantizes with its own code, independent of ef_jax.quant.pool.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.expert_ffn import (BlockSizes, _block, _group_rows, _is_pow2, _triton_params, _whole,
                                       expert_ffn_reference)

F32 = jnp.float32


# ---- reference -------------------------------------------------------------------------------------------------


def _dequant_jnp(codes, scale, offset, bits: int, dtype):
    """codes u8[..., I·b/8, O], scale/offset f16[..., I/G, O] → [..., I, O] dtype (plain jnp)."""
    u = jnp.concatenate([codes & 0xF, codes >> 4], axis=-2) if bits == 4 else codes
    rows, groups = u.shape[-2], scale.shape[-2]
    s = jnp.repeat(scale.astype(F32), rows // groups, axis=-2)
    w = (u.astype(F32) - (1 << (bits - 1))) * s if offset is None else (
        u.astype(F32) * s + jnp.repeat(offset.astype(F32), rows // groups, axis=-2))
    return w.astype(dtype)


def quant_expert_ffn_reference(x, slot_ids, weights, codes, scales, offsets, *, bits: int):
    """Plain jnp: dequantize every slot, then expert_ffn_reference. codes/scales/offsets: (gate, up, down) tuples
    (offsets None when symmetric). Same contract as quant_expert_ffn."""
    offsets = offsets or (None, None, None)
    w = [_dequant_jnp(c, s, o, bits, x.dtype) for c, s, o in zip(codes, scales, offsets)]
    return expert_ffn_reference(x, slot_ids, weights, *w)


# ---- tile dequantization (inside kernels) ----------------------------------------------------------------------


def _dq(c, s, m, bits: int):
    """A code tile u8[r, n] (nibbles already extracted) with its group's scale/offset rows [1, n] → f32[r, n]."""
    c = c.astype(F32)
    if m is None:
        return (c - (1 << (bits - 1))) * s.astype(F32)
    return c * s.astype(F32) + m.astype(F32)


def _gate_up(x_ref, w, slot, cols, *, bits: int, g: int):
    """(x·gate, x·up) for a block of rows x_ref [rows, D] and F columns `cols`: f32 [rows, bf] each.
    w = (gate, up, gate_scale, up_scale, gate_offset | None, up_offset | None) refs over the whole pool."""
    gc, uc, gs, us, go, uo = w
    rows_x, D = x_ref.shape
    bf = cols.size
    half = D // 2

    def tile(c_ref, s_ref, o_ref, prow, grp, nib):  # → dequantized [g, bf] in x's dtype
        c = c_ref[slot, prow, cols]
        if nib is not None:
            c = (c >> 4) if nib else (c & 0xF)
        gsl = pl.ds(grp, 1)
        return _dq(c, s_ref[slot, gsl, cols], None if o_ref is None else o_ref[slot, gsl, cols], bits).astype(
            x_ref.dtype)

    if bits == 8:
        def body(j, acc):
            rows = pl.ds(pl.multiple_of(j * g, g), g)
            xj = x_ref[:, rows]
            return (acc[0] + jnp.dot(xj, tile(gc, gs, go, rows, j, None), preferred_element_type=F32),
                    acc[1] + jnp.dot(xj, tile(uc, us, uo, rows, j, None), preferred_element_type=F32))
        steps = D // g
    else:
        hi_groups = half // g

        def body(j, acc):
            prow = pl.ds(pl.multiple_of(j * g, g), g)                     # packed rows = rows j·g.. (low nibble)
            x_lo, x_hi = x_ref[:, prow], x_ref[:, pl.ds(pl.multiple_of(half + j * g, g), g)]  # and D/2 + j·g..
            a_g = (jnp.dot(x_lo, tile(gc, gs, go, prow, j, 0), preferred_element_type=F32)
                   + jnp.dot(x_hi, tile(gc, gs, go, prow, j + hi_groups, 1), preferred_element_type=F32))
            a_u = (jnp.dot(x_lo, tile(uc, us, uo, prow, j, 0), preferred_element_type=F32)
                   + jnp.dot(x_hi, tile(uc, us, uo, prow, j + hi_groups, 1), preferred_element_type=F32))
            return acc[0] + a_g, acc[1] + a_u
        steps = half // g
    zero = jnp.zeros((rows_x, bf), F32)
    return jax.lax.fori_loop(0, steps, body, (zero, zero))


# ---- decode ----------------------------------------------------------------------------------------------------


def _decode_kernel(uniq_ref, cw_ref, x_ref, gc, uc, dc, gs, us, ds, *refs, bits: int, g: int, gf: int, bd: int,
                   asym: bool):
    """Program (u, f): slot uniq[u], F block f (= down group f, bf = Gf), every (padded) token → partial o[0, 0]."""
    go, uo, do = refs[:3] if asym else (None, None, None)
    o_ref = refs[-1]
    u, f = pl.program_id(0), pl.program_id(1)
    slot = uniq_ref[u]
    tp, D = x_ref.shape
    F = gc.shape[2]
    bf = gf
    cols = pl.ds(pl.multiple_of(f * bf, bf), bf)

    @pl.when(slot < 0)
    def _():
        @pl.loop(0, D // bd)
        def _(j):
            o_ref[0, 0, :, pl.ds(pl.multiple_of(j * bd, bd), bd)] = jnp.zeros((tp, bd), F32)

    @pl.when(slot >= 0)
    def _():
        a_g, a_u = _gate_up(x_ref, (gc, uc, gs, us, go, uo), slot, cols, bits=bits, g=g)
        h = (jax.nn.silu(a_g) * a_u * cw_ref[u, :][:, None]).astype(x_ref.dtype)     # [Tp, bf]
        if bits == 8:
            drows = cols
        else:  # F block f lies in the low nibbles (rows < F/2) or the high ones, at packed rows (f·bf) mod F/2
            half = F // 2
            drows = pl.ds(pl.multiple_of((f * bf) % half, bf), bf)
            shift = jnp.where(f * bf >= half, 4, 0).astype(jnp.uint8)

        @pl.loop(0, D // bd)
        def _(j):
            out = pl.ds(pl.multiple_of(j * bd, bd), bd)
            c = dc[slot, drows, out]
            if bits == 4:
                c = (c >> shift) & 0xF
            grp = pl.ds(f, 1)
            w = _dq(c, ds[slot, grp, out], None if do is None else do[slot, grp, out], bits).astype(x_ref.dtype)
            o_ref[0, 0, :, out] = jnp.dot(h, w, preferred_element_type=F32)


def _operands(codes, scales, offsets):
    ops = [*codes, *scales]
    return ops + list(offsets) if offsets is not None else ops


def _decode(x, slot_ids, weights, codes, scales, offsets, bits, g, gf, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = codes[0].shape
    K = slot_ids.shape[1]
    tp = max(16, 1 << (T - 1).bit_length())
    bd = _block(D, bs.decode_block_d, "D", interpret)
    U = T * K
    uniq = jnp.unique(slot_ids.reshape(-1), size=U, fill_value=-1).astype(jnp.int32)      # i32[U]
    hit = (slot_ids[None, :, :] == uniq[:, None, None]) & (uniq[:, None, None] >= 0)      # bool[U, T, K]
    cw = jnp.pad(jnp.einsum("utk,tk->ut", hit.astype(F32), weights.astype(F32)), ((0, 0), (0, tp - T)))
    xp = jnp.pad(x, ((0, tp - T), (0, 0)))
    ops = _operands(codes, scales, offsets)
    out = pl.pallas_call(
        functools.partial(_decode_kernel, bits=bits, g=g, gf=gf, bd=bd, asym=offsets is not None),
        grid=(U, F // gf),
        in_specs=[_whole((U,)), _whole((U, tp)), _whole((tp, D))] + [_whole(a.shape) for a in ops],
        out_specs=pl.BlockSpec((1, 1, tp, D), lambda u, f: (u, f, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((U, F // gf, tp, D), F32),
        compiler_params=None if interpret else _triton_params(bs.decode_num_warps, bs.num_stages),
        interpret=interpret,
    )(uniq, cw, xp, *ops)
    return out.sum(axis=(0, 1))[:T].astype(x.dtype)


# ---- prefill ---------------------------------------------------------------------------------------------------


def _gate_up_kernel(tile_slot_ref, xs_ref, gc, uc, gs, us, *refs, bits: int, g: int, bf: int, asym: bool):
    go, uo = refs[:2] if asym else (None, None)
    h_ref = refs[-1]
    s = tile_slot_ref[pl.program_id(0)]
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bf, bf), bf)

    @pl.when(s < 0)
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)

    @pl.when(s >= 0)
    def _():
        a_g, a_u = _gate_up(xs_ref, (gc, uc, gs, us, go, uo), s, cols, bits=bits, g=g)
        h_ref[...] = (jax.nn.silu(a_g) * a_u).astype(h_ref.dtype)


def _down_kernel(tile_slot_ref, h_ref, dc, ds, *refs, bits: int, gf: int, bd: int, asym: bool):
    """Program (i, j): rows of tile i × D block j → y [bm, bd] = h · dequant(down)[:, block] (f32)."""
    do = refs[0] if asym else None
    y_ref = refs[-1]
    s = tile_slot_ref[pl.program_id(0)]
    bm, F = h_ref.shape
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)

    def w(prow, grp, nib):
        c = dc[s, prow, cols]
        if nib is not None:
            c = (c >> 4) if nib else (c & 0xF)
        gsl = pl.ds(grp, 1)
        return _dq(c, ds[s, gsl, cols], None if do is None else do[s, gsl, cols], bits).astype(h_ref.dtype)

    @pl.when(s < 0)
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)

    @pl.when(s >= 0)
    def _():
        if bits == 8:
            def body(k, acc):
                ks = pl.ds(pl.multiple_of(k * gf, gf), gf)
                return acc + jnp.dot(h_ref[:, ks], w(ks, k, None), preferred_element_type=F32)
            steps = F // gf
        else:
            half = F // 2

            def body(k, acc):
                prow = pl.ds(pl.multiple_of(k * gf, gf), gf)
                hi = pl.ds(pl.multiple_of(half + k * gf, gf), gf)
                return (acc + jnp.dot(h_ref[:, prow], w(prow, k, 0), preferred_element_type=F32)
                        + jnp.dot(h_ref[:, hi], w(prow, k + half // gf, 1), preferred_element_type=F32))
            steps = half // gf
        y_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bd), F32))


def _prefill(x, slot_ids, weights, codes, scales, offsets, bits, g, gf, bs: BlockSizes, interpret: bool):
    T, D = x.shape
    S, _, F = codes[0].shape
    K = slot_ids.shape[1]
    bm = bs.block_m
    bf, bd = _block(F, bs.block_f, "F", interpret), _block(D, bs.block_d, "D", interpret)
    row, tile_slot, R = _group_rows(slot_ids, S, bm)
    tiles = R // bm
    token = jnp.arange(T * K, dtype=jnp.int32) // K
    xs = jnp.zeros((R, D), x.dtype).at[row].set(x[token])
    params = None if interpret else _triton_params(bs.num_warps, bs.num_stages)
    asym = offsets is not None
    gu = [codes[0], codes[1], scales[0], scales[1]] + ([offsets[0], offsets[1]] if asym else [])
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, bits=bits, g=g, bf=bf, asym=asym),
        grid=(tiles, F // bf),
        in_specs=[_whole((tiles,)), pl.BlockSpec((bm, D), lambda i, j: (i, 0))] + [_whole(a.shape) for a in gu],
        out_specs=pl.BlockSpec((bm, bf), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, F), x.dtype),
        compiler_params=params,
        interpret=interpret,
    )(tile_slot, xs, *gu)
    dn = [codes[2], scales[2]] + ([offsets[2]] if asym else [])
    y = pl.pallas_call(
        functools.partial(_down_kernel, bits=bits, gf=gf, bd=bd, asym=asym),
        grid=(tiles, D // bd),
        in_specs=[_whole((tiles,)), pl.BlockSpec((bm, F), lambda i, j: (i, 0))] + [_whole(a.shape) for a in dn],
        out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((R, D), F32),
        compiler_params=params,
        interpret=interpret,
    )(tile_slot, h, *dn)
    return jnp.einsum("tkd,tk->td", y[row].reshape(T, K, D), weights.astype(F32)).astype(x.dtype)


# ---- public wrapper --------------------------------------------------------------------------------------------


def _validate(x, slot_ids, weights, codes, scales, offsets, bits, interpret):
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} must be 8 or 4")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [T ≥ 1, D], got shape {x.shape}")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x dtype {x.dtype} is not supported: use float32 or bfloat16")
    T, D = x.shape
    if slot_ids.ndim != 2 or slot_ids.shape[0] != T or slot_ids.shape[1] == 0 or slot_ids.dtype != jnp.int32:
        raise ValueError(f"slot_ids must be i32[T={T}, K ≥ 1], got {slot_ids.dtype}{list(slot_ids.shape)}")
    if weights.shape != slot_ids.shape:
        raise ValueError(f"weights must match slot_ids' shape {slot_ids.shape}, got {weights.shape}")
    per = 8 // bits
    S, F = codes[0].shape[0], codes[0].shape[2]
    want = ((S, D // per, F), (S, D // per, F), (S, F // per, D))
    for name, c, shape in zip(("gate", "up", "down"), codes, want):
        if c.dtype != jnp.uint8 or c.shape != shape:
            raise ValueError(f"{name} codes must be u8{list(shape)} for D={D}, int{bits}; got {c.dtype}{list(c.shape)}")
    g, gf = D // scales[0].shape[1], F // scales[2].shape[1]
    for name, s, rows, cols in (("gate", scales[0], D, F), ("up", scales[1], D, F), ("down", scales[2], F, D)):
        if s.ndim != 3 or s.shape[0] != S or s.shape[2] != cols or rows % s.shape[1]:
            raise ValueError(f"{name} scales must be [S={S}, groups dividing {rows}, {cols}], got {list(s.shape)}")
    if offsets is not None:
        for name, o, s in zip(("gate", "up", "down"), offsets, scales):
            if o.shape != s.shape:
                raise ValueError(f"{name} offsets must have its scales' shape {s.shape}, got {o.shape}")
    if bits == 4 and (D % (2 * g) or F % (2 * gf)):
        raise ValueError(f"int4 planar packing needs D % 2G == 0 and F % 2Gf == 0 (D={D}, G={g}, F={F}, Gf={gf}): "
                         "choose a group size dividing D/2 and F/2")
    if not interpret:
        for name, v in (("gate/up group size", g), ("down group size", gf)):
            if not _is_pow2(v) or v < 16:
                raise ValueError(f"{name}={v} must be a power of two ≥ 16 for the native kernel (Triton tiles); "
                                 "quantize with group_size=32/64/128")
    return g, gf


def quant_expert_ffn(x, slot_ids, weights, codes, scales, offsets=None, *, bits: int,
                     block_sizes: BlockSizes | None = None, interpret: bool = False, regime: str | None = None):
    """Σ_k weights[t,k] · SwiGLU expert in slot slot_ids[t,k] of a quantized pool, dequantized in the kernel.

    Args:
      x: [T, D] float32 or bfloat16.
      slot_ids: i32[T, K]; weights: f[T, K].
      codes: (gate u8[S, D·b/8, F], up u8[S, D·b/8, F], down u8[S, F·b/8, D]) — ef_jax.quant's layout.
      scales: (gate f16[S, D/G, F], up f16[S, D/G, F], down f16[S, F/Gf, D]); offsets: same shapes, or None
        (symmetric codes).
      bits: 8 or 4.
      block_sizes, interpret, regime: as kernels_pallas.expert_ffn (decode's F block is the down group, Gf).
    Returns:
      [T, D] in x's dtype, accumulated in float32.
    """
    codes, scales = tuple(codes), tuple(scales)
    offsets = None if offsets is None or offsets[0] is None else tuple(offsets)
    g, gf = _validate(x, slot_ids, weights, codes, scales, offsets, bits, interpret)
    if regime not in (None, "decode", "prefill"):
        raise ValueError(f"regime={regime!r} must be None (choose by T), 'decode' or 'prefill'")
    bs = block_sizes or BlockSizes.get_default(jax.devices()[0].device_kind, x.shape[1], codes[0].shape[2])
    regime = regime or ("decode" if x.shape[0] <= bs.decode_max_tokens else "prefill")
    fn = _decode if regime == "decode" else _prefill
    return fn(x, slot_ids, weights, codes, scales, offsets, bits, g, gf, bs, interpret)


def quant_pool_expert_ffn(x, slot_ids, weights, pool, **kw):
    """quant_expert_ffn over an ef_jax.quant.QuantExpertPool (any object with its fields and `bits`)."""
    return quant_expert_ffn(x, slot_ids, weights, (pool.gate, pool.up, pool.down),
                            (pool.gate_scale, pool.up_scale, pool.down_scale),
                            (pool.gate_offset, pool.up_offset, pool.down_offset), bits=pool.bits, **kw)
