"""The routed-expert FFN in blocks, so converting the slots it reads never materialises more than a bound.

Whenever the expert FFN reads weights in another dtype than they are held in — int8/int4 codes dequantized
(ef_jax.quant.pool), or bf16 experts upcast under float32 compute (the CPU default) — XLA writes the converted
matrices out before the matmuls consume them (a CPU dot fuses no producer). Converting a layer's whole slot pool
at once (the grouped prefill path) is 3·D·F·4 bytes per slot in f32: 2.2 GB for one DeepSeek-V2-Lite layer of 64
slots, more than the int4 pool itself (0.3 GB), and on the CPU backend that "device" memory is host RSS. So above
CONVERT_BLOCK_BYTES the two formulations of ef_jax.models.moe run as a loop whose body converts one block:

  gather (decode):  pairs (n, k) in blocks of c → convert c slots [c, D, F] → SwiGLU per pair → y[n, k] → Σ_k w·y
  dense (prefill):  the distinct slots the pairs use, in blocks of b → convert b slots [b, D, F] → SwiGLU of every
                    token through each of them → Σ over the block with the combine weights
                    w[n, s] = Σ_k w[n, k]·[slot[n, k] = s] (0 for a slot token n did not choose)

A lax loop (not a Python one; each body under a cond, see guarded_loop) so that XLA reuses one block's buffers:
the program's temporaries stay about one block whatever the pool size. The dense form multiplies every token by
every used slot (U·N products, U ≤ S, no grouping): where ragged_dot is lowered densely (the CPU backend: S·N·K
products) it is also less work. Neither form needs one layer's slots apart, so a caller holding a stacked pool
[L, S, ...] passes it seen as [L·S, ...] (ef_jax.engine.programs.layer.layer_view) instead of copying the layer
out.
Pools read in their own dtype (bf16 under bf16 compute) convert nothing and never come here.

Axes: N tokens, K top-k, P = N·K pairs, S slots, U distinct slots used, D model, F expert FFN width,
c pairs / b slots per block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ef_jax.quant.pool import QuantExpertPool

# Bytes of converted expert weights one block may hold: a quarter of a GiB keeps the block temporaries well under
# the 1 GiB of host headroom issue 24 allows beside the pinned experts and the slot pool, while a block still holds
# several experts of real models (7 f32 DeepSeek-V2-Lite experts; at least one expert, whatever its size).
CONVERT_BLOCK_BYTES = 256 << 20


def matrices(pool, slot_ids, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(gate, up, down) of `slot_ids` (None: every slot) in `dtype`: [*idx, D, F], [*idx, D, F], [*idx, F, D].
    A quantized pool is dequantized, a float one indexed and cast (exact for bf16 → f32); inside the caller's jit."""
    if isinstance(pool, QuantExpertPool):
        return tuple(pool.matrix(m, slot_ids, dtype) for m in ("gate", "up", "down"))
    pick = (lambda a: a) if slot_ids is None else (lambda a: a[slot_ids])
    return tuple(pick(a).astype(dtype) for a in (pool.gate, pool.up, pool.down))


def converted_bytes_per_slot(pool, dtype) -> int:
    """Bytes that reading one slot of `pool` in `dtype` writes out (0: the pool is read as it is held)."""
    if not isinstance(pool, QuantExpertPool) and jnp.dtype(pool.gate.dtype) == jnp.dtype(dtype):
        return 0
    D, F = pool.down.shape[-1], pool.gate.shape[-1]
    return 3 * D * F * jnp.dtype(dtype).itemsize


def per_block(pool, dtype, limit: int = CONVERT_BLOCK_BYTES) -> int | None:
    """Slots (or pairs) one block may convert, at least 1; None when the pool converts nothing."""
    per_slot = converted_bytes_per_slot(pool, dtype)
    return None if per_slot == 0 else max(1, limit // per_slot)


def guarded_loop(n, body, init):
    """lax.fori_loop(0, n, body, init), each body under a cond on i < n (always true). XLA's CPU backend computes a
    bf16 gather in f32, and in a bare loop body it hoists that upcast of the loop-invariant pool out of the loop:
    the whole pool converted once (2.3 GB for a DeepSeek-V2-Lite layer of bf16 experts under f32; an optimization
    barrier between gather and convert does not stop it), which is what the blocks are there to avoid. Nothing is
    hoisted out of a conditional's branch. The device step's row copies (engine/programs/device_cache) loop the same
    way, for the same reason."""
    return jax.lax.fori_loop(0, n, lambda i, c: jax.lax.cond(i < n, body, lambda i, c: c, i, c), init)


def _swiglu_pairs(xs: jax.Array, g: jax.Array, u: jax.Array, d: jax.Array) -> jax.Array:
    """One expert per row: xs [c, D], g/u [c, D, F], d [c, F, D] → f32[c, D]."""
    h = jax.nn.silu(jnp.einsum("cd,cdf->cf", xs, g)) * jnp.einsum("cd,cdf->cf", xs, u)
    return jnp.einsum("cf,cfd->cd", h, d, preferred_element_type=jnp.float32)


def gather_blocked(x: jax.Array, slot_ids: jax.Array, weights: jax.Array, pool, pairs_per_block: int,
                   out_dtype=None) -> jax.Array:
    """moe.expert_ffn_gather with the N·K pairs in blocks of `pairs_per_block` (each block converts that many
    slots). x [N, D], slot_ids i32[N, K], weights f32[N, K] → [N, D] (out_dtype, default x's)."""
    N, K = slot_ids.shape
    P, c = N * K, min(pairs_per_block, N * K)
    blocks = -(-P // c)
    pad = blocks * c - P  # padding pairs read slot 0 for token 0; their rows are cut off below
    slots = jnp.pad(slot_ids.reshape(-1), (0, pad))                      # i32[blocks·c]
    tokens = jnp.pad(jnp.arange(P, dtype=jnp.int32) // K, (0, pad))      # i32[blocks·c]

    def body(i, y):
        s, t = (jax.lax.dynamic_slice_in_dim(a, i * c, c) for a in (slots, tokens))  # i32[c], i32[c]
        return jax.lax.dynamic_update_slice_in_dim(y, _swiglu_pairs(x[t], *matrices(pool, s, x.dtype)), i * c, 0)

    y = guarded_loop(blocks, body, jnp.zeros((blocks * c, x.shape[-1]), jnp.float32))
    y = y[:P].reshape(N, K, -1)                                          # f32[N, K, D]
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32)).astype(out_dtype or x.dtype)


def used_slots(slot_ids: jax.Array, weights: jax.Array, num_slots: int, pad: int) -> tuple[jax.Array, jax.Array]:
    """The distinct slots that pairs with a non-zero weight read, ascending: (i32[U + pad], zeros after the first
    `count`; i32[] count), U = min(N·K, num_slots) (at most that many can differ)."""
    U = min(slot_ids.size, num_slots)
    flat = jnp.where(weights.reshape(-1) != 0, slot_ids.reshape(-1), num_slots)  # num_slots: a pair left out
    srt = jnp.sort(flat)
    first = jnp.concatenate([jnp.ones(1, bool), srt[1:] != srt[:-1]]) & (srt < num_slots)
    at = jnp.where(first, jnp.cumsum(first) - 1, U + pad)  # out of range: dropped
    return jnp.zeros(U + pad, jnp.int32).at[at].set(srt, mode="drop"), first.sum(dtype=jnp.int32)


def dense_blocked(x: jax.Array, slot_ids: jax.Array, weights: jax.Array, pool, slots_per_block: int,
                  out_dtype=None) -> jax.Array:
    """Σ_k weights[n,k] · FFN_{slot_ids[n,k]}(x[n]) over the slots the pairs use, `slots_per_block` at a time:
    each block converts its slots and runs every token through them, weighted by the combine weights (0 for a slot
    a token did not choose). Slots no pair reads (with a non-zero weight) are never converted, so `pool` may be a
    stacked pool seen as [L·S, ...] (no copy of one layer's slots) with slot_ids pointing into one layer's block.
    x [N, D], slot_ids i32[N, K], weights f32[N, K] → [N, D] (out_dtype, default x's)."""
    N, K = slot_ids.shape
    b = min(slots_per_block, N * K, pool.gate.shape[0])
    used, count = used_slots(slot_ids, weights, pool.gate.shape[0], b)  # i32[U + b], i32[]
    weights = weights.astype(jnp.float32)

    def body(i, acc):
        ids = jax.lax.dynamic_slice_in_dim(used, i * b, b)                 # i32[b]
        live = i * b + jnp.arange(b) < count                               # bool[b]: past `count` is padding
        hit = (slot_ids[:, :, None] == ids) & live                         # bool[N, K, b]
        w = jnp.where(hit, weights[:, :, None], 0.0).sum(axis=1)           # f32[N, b] combine weights
        g, u, d = matrices(pool, ids, x.dtype)                             # [b, D, F], [b, D, F], [b, F, D]
        h = jax.nn.silu(jnp.einsum("nd,bdf->bnf", x, g)) * jnp.einsum("nd,bdf->bnf", x, u)
        y = jnp.einsum("bnf,bfd->bnd", h, d, preferred_element_type=jnp.float32)
        return acc + jnp.einsum("bnd,nb->nd", y, w)

    acc = guarded_loop((count + b - 1) // b, body, jnp.zeros((N, x.shape[-1]), jnp.float32))
    return acc.astype(out_dtype or x.dtype)
