"""Mixture-of-experts block whose routed expert weights come from a slot pool.

[x] → route (softmax → top-k, family rules) → slot ids = slot_of_expert[experts] → expert FFN read through the
slot pool → weighted sum (+ shared expert) → [y]

Axes: N tokens (B·T flattened), D model, E experts, K top-k, S slots, F expert FFN width.

Quantized experts (ef_jax.quant): the pool is then a QuantExpertPool (int8/int4 codes + float16 scales), and the
expert FFN dequantizes inside its own jitted computation only the weights it reads (the K gathered slots per token
in decode, the pool in prefill), a block at a time when that would write more than a bound (expert_blocks); bf16
experts under float32 compute are upcast the same way.

The block is a pure function of (block params, routing, slot pool, slot_of_expert), so the same code runs
all-resident (pool = every expert, slot_of_expert = identity) and offloaded (pool = a few device slots that the
host scheduler fills). Routing is split from the expert compute so the host can read the chosen experts
between the two and make them resident.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ef_jax import pytree

from ef_jax.config import ModelConfig
from ef_jax.models import expert_blocks
from ef_jax.models.layers import swiglu
from ef_jax.quant.pool import QuantExpertPool

# Below this many (token, expert) pairs the gather formulation is used (decode: weights dominate the traffic);
# above it, tokens are grouped by slot and multiplied with ragged_dot (prefill: compute dominates).
GATHER_MAX_PAIRS = 64


@pytree.dataclass
class ExpertPool:
    """Routed expert weights held in S slots (S = E when all experts are resident)."""
    gate: jax.Array  # [S, D, F]
    up: jax.Array    # [S, D, F]
    down: jax.Array  # [S, F, D]


@pytree.dataclass
class Routing:
    """The router's decision for N tokens."""
    logits: jax.Array   # f32[N, E] raw router logits
    experts: jax.Array  # i32[N, K] chosen experts
    weights: jax.Array  # f32[N, K] combine weights (after the family's renormalisation / scaling)


def route(p: dict, cfg: ModelConfig, x: jax.Array) -> Routing:
    """x [N, D] → Routing, exactly as the family's transformers router: softmax in float32, then top-k."""
    if cfg.router_fp32_weight:  # DeepSeek-V2: router weight and matmul in float32
        logits = x.astype(jnp.float32) @ p["router"].astype(jnp.float32)
    else:
        logits = (x @ p["router"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if cfg.topk_method == "group_limited_greedy":
        # Keep only the topk_group groups with the best single expert; experts outside score 0.
        N, E = probs.shape
        grouped = probs.reshape(N, cfg.n_group, E // cfg.n_group)
        _, best_groups = jax.lax.top_k(grouped.max(axis=-1), cfg.topk_group)
        keep = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], best_groups].set(True)
        probs = jnp.where(keep[:, :, None], grouped, 0.0).reshape(N, E)
    weights, experts = jax.lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    weights = weights * cfg.routed_scaling_factor
    return Routing(logits=logits, experts=experts.astype(jnp.int32), weights=weights)


def expert_ffn_gather(x: jax.Array, slot_ids: jax.Array, weights: jax.Array, pool, out_dtype=None) -> jax.Array:
    """Decode regime: gather the K selected slots per token, then SwiGLU. x [N, D], slot_ids i32[N, K] → [N, D]
    (out_dtype, default x's). pool: ExpertPool or QuantExpertPool. When converting the N·K gathered slots
    (dequantizing, or upcasting bf16 to f32) would write more than expert_blocks.CONVERT_BLOCK_BYTES, the pairs run
    in blocks (expert_blocks.gather_blocked)."""
    per = expert_blocks.per_block(pool, x.dtype)
    if per is not None and slot_ids.size > per:
        return expert_blocks.gather_blocked(x, slot_ids, weights, pool, per, out_dtype)
    g, u, d = expert_blocks.matrices(pool, slot_ids, x.dtype)  # [N, K, D, F] / [N, K, F, D]
    h = jax.nn.silu(jnp.einsum("nd,nkdf->nkf", x, g)) * jnp.einsum("nd,nkdf->nkf", x, u)
    y = jnp.einsum("nkf,nkfd->nkd", h, d, preferred_element_type=jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32)).astype(out_dtype or x.dtype)


def slices_layer(pool, slots: int, pairs: int, dtype) -> bool:
    """Whether expert_ffn over `pairs` (token, expert) pairs of a layer's `slots` slots, computed in `dtype`, reads
    the layer's pool whole (the grouped formulation, unblocked). Only then does a caller holding a stacked pool
    [L, S, ...] (`pool`) slice the layer out; the gather and the blocked forms read just the slots they need from
    the stacked pool seen as [L·S, ...], and slicing it would copy the layer (0.3 GB of int4 DeepSeek-V2-Lite
    experts, 1.1 GB of bf16 ones) for nothing."""
    per = expert_blocks.per_block(pool, dtype)
    return pairs > GATHER_MAX_PAIRS and (per is None or slots <= per)


def expert_ffn_grouped(x: jax.Array, slot_ids: jax.Array, weights: jax.Array, pool, out_dtype=None) -> jax.Array:
    """Prefill regime: sort the N·K (token, slot) pairs by slot and run grouped matmuls. Same contract. When
    converting the whole pool (dequantizing, or upcasting bf16 to f32) would write more than
    expert_blocks.CONVERT_BLOCK_BYTES, the slots the pairs use run in blocks instead (expert_blocks.dense_blocked).
    (slices_layer says which of the two a given pool and size takes.)"""
    N, K = slot_ids.shape
    S = pool.gate.shape[0]
    per = expert_blocks.per_block(pool, x.dtype)
    if per is not None and S > per:
        return expert_blocks.dense_blocked(x, slot_ids, weights, pool, per, out_dtype)
    gate, up, down = expert_blocks.matrices(pool, None, x.dtype)   # [S, D, F], [S, D, F], [S, F, D]
    flat = slot_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of_pair = order // K
    xs = x[token_of_pair]                                           # [N·K, D] grouped by slot
    sizes = jnp.bincount(flat, length=S).astype(jnp.int32)
    h = (jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes))
         * jax.lax.ragged_dot(xs, up, sizes))
    y = jax.lax.ragged_dot(h, down, sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((N, x.shape[-1]), jnp.float32).at[token_of_pair].add(y).astype(out_dtype or x.dtype)


EXPERT_KERNELS = ("xla", "pallas", "pallas-interpret")
# How the routed experts are multiplied: a static argument of every program that computes experts (each model
# carries its own: ef_jax.load(expert_kernel=...) → Model.expert_kernel; two models in one process may differ).
#   "xla": the gather / ragged_dot formulations above (default; verified everywhere).
#   "pallas": kernels_pallas.expert_ffn lowered with Triton (an NVIDIA GPU; ef_jax.cache.support refuses others).
#   "pallas-interpret": the same kernel in Pallas interpret mode (CPU tests of the integration; slow).


def check_expert_kernel(name) -> str:
    """name, or a ValueError naming the choices (the API's boundary check, before any work)."""
    if name not in EXPERT_KERNELS:
        raise ValueError(f"expert_kernel={name!r} must be one of {EXPERT_KERNELS}")
    return name


def expert_ffn(x: jax.Array, slot_ids: jax.Array, weights: jax.Array, pool, out_dtype=None, *,
               kernel: str) -> jax.Array:
    """Σ_k weights[n,k] · FFN_{slot_ids[n,k]}(x[n]). x [N, D], slot_ids i32[N, K], weights f32[N, K] → [N, D].
    pool: ExpertPool, or QuantExpertPool (dequantized inside this computation). out_dtype: of the sum (default
    x's; an expert-parallel caller asks for float32 partial sums, so adding them across devices rounds once).
    kernel: one of EXPERT_KERNELS (static); "xla" chooses its formulation by problem size."""
    if kernel != "xla":
        interpret = check_expert_kernel(kernel) == "pallas-interpret"
        if isinstance(pool, QuantExpertPool):
            from kernels_pallas import quant_pool_expert_ffn
            y = quant_pool_expert_ffn(x, slot_ids, weights, pool, interpret=interpret)
        else:
            from kernels_pallas import expert_ffn as pallas_expert_ffn
            y = pallas_expert_ffn(x, slot_ids, weights, *(a.astype(x.dtype) for a in (pool.gate, pool.up, pool.down)),
                                  interpret=interpret)
        return y.astype(out_dtype or x.dtype)
    if slot_ids.size <= GATHER_MAX_PAIRS:
        return expert_ffn_gather(x, slot_ids, weights, pool, out_dtype)
    return expert_ffn_grouped(x, slot_ids, weights, pool, out_dtype)


def moe_combine(p: dict, cfg: ModelConfig, x: jax.Array, routing: Routing, pool: ExpertPool,
                slot_of_expert: jax.Array, include_shared: bool = True, *, kernel: str) -> jax.Array:
    """The block's output for normalised input x [N, D] given its routing; slot_of_expert i32[E] maps each
    chosen expert to the pool slot holding it (pool: an ExpertPool, a QuantExpertPool, or a MeshPool whose slots are
    split over devices, ef_jax.models.expert_parallel: then the slot within the owning device's block) (the caller guarantees every chosen expert with a non-zero weight
    is resident). include_shared=False leaves out the shared expert (for the 2nd+ pass of a split layer).
    kernel: the expert FFN's implementation, one of EXPERT_KERNELS (static in the caller's jit)."""
    slots = slot_of_expert[routing.experts]
    if not isinstance(pool, (ExpertPool, QuantExpertPool)):  # a MeshPool: the experts are split over devices
        y = pool.expert_ffn(x, routing.experts, slots, routing.weights, kernel)  # (ef_jax.models.expert_parallel)
    else:
        y = expert_ffn(x, slots, routing.weights, pool, kernel=kernel)
    if cfg.shared_intermediate and include_shared:
        y = y + shared_output(p, cfg, x)
    return y


def shared_output(p: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The shared expert's output (gated where the family gates it) for normalised x [N, D] → [N, D]; the caller
    checks cfg.shared_intermediate."""
    s = p["shared"]
    shared = swiglu(x, s["gate"], s["up"], s["down"])
    if cfg.shared_expert_gate:
        shared = jax.nn.sigmoid(x @ p["shared_gate"]) * shared
    return shared
