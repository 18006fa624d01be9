"""Expert parallelism: the routed-expert FFN of a MoE layer computed by the devices of a mesh's `expert` axis, each
over the experts it owns, the outputs summed across devices.

x [N, D], routing (replicated on every device) → shard_map over `axis`: device d keeps the (token, expert) pairs whose
expert it owns (owner[e] == d), reads them from its own slots, f32 partial sums → psum over `axis` → [N, D]

Decode moves only a few tokens, and every device already holds them (non-expert weights are replicated, so every
device runs the same attention and router): no all-gather is needed before the experts, and one psum of the [N, D]
partial outputs combines them. Each pair is computed on exactly one device; the others contribute exact zeros.

MeshPool wraps a slot pool whose slot axis is split over the mesh: device d's block holds its own slots. Two layouts:
  per layer  leaves [n·S, ...]     (the resident source: S = E_max, every owned expert in its slot)
  stacked    leaves [L, n·S, ...]  (the offloaded source: S slots per device per MoE layer), read at `layer`
slots i32[N, K] are slot indices *within the owner's block*; the caller's slot_of_expert maps each expert to its
slot on the device that owns it (one replicated table, since each expert has exactly one owner).

Axes: N tokens, K top-k, D model, E experts, n devices on `axis`, S slots per device, L MoE layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from ef_jax import pytree
from jax.sharding import PartitionSpec as P

from ef_jax.models.moe import expert_ffn, slices_layer


@pytree.dataclass
class MeshPool:
    """A slot pool split over the mesh's `axis` (see the module docstring for the two layouts)."""
    pool: object             # ExpertPool | QuantExpertPool: leaves [n·S, ...] or stacked [L, n·S, ...]
    layer: jax.Array | None  # i32[] the MoE layer to read in a stacked pool; None for a per-layer pool
    mesh: object = pytree.field(pytree_node=False)
    axis: str = pytree.field(pytree_node=False)
    owner: tuple = pytree.field(pytree_node=False)  # owner[e]: the device index on `axis` that owns expert e

    def expert_ffn(self, x, experts, slots, weights, kernel: str):
        """moe_combine's routed FFN for this pool (see expert_parallel_ffn)."""
        return expert_parallel_ffn(x, experts, slots, weights, self, kernel)


def _local_view(pool, layer, pairs: int, dtype):
    """A device's block → (pool to read, slot offset): per-layer blocks are read as they are; a stacked [L, S, ...]
    block is flattened to [L·S, ...] for decode and for a pool converted in blocks (neither needs a copy of the
    layer's slots, see moe.slices_layer) or sliced at `layer` for an unblocked prefill (grouped matmuls over the
    layer's S slots)."""
    if layer is None:
        return pool, 0
    L, S = jax.tree.leaves(pool)[0].shape[:2]
    if not slices_layer(pool, S, pairs, dtype):
        return jax.tree.map(lambda a: a.reshape((L * S,) + a.shape[2:]), pool), layer * S
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), pool), 0


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, slots: jax.Array, weights: jax.Array,
                        mp: MeshPool, kernel: str) -> jax.Array:
    """Σ_k weights[n,k] · FFN_{experts[n,k]}(x[n]) with each expert read on the device that owns it.
    x [N, D]; experts, slots i32[N, K] (slot within the owner's block); weights f32[N, K] (0 = leave out) → [N, D].
    kernel: each device's expert FFN (ef_jax.models.moe.EXPERT_KERNELS, static)."""
    owner = jnp.asarray(mp.owner, jnp.int32)
    stacked = mp.layer is not None
    block = P(None, mp.axis) if stacked else P(mp.axis)

    def local(x, experts, slots, weights, pool, layer):
        mine = owner[experts] == jax.lax.axis_index(mp.axis)  # bool[N, K]: pairs this device computes
        view, offset = _local_view(pool, layer if stacked else None, slots.size, x.dtype)
        y = expert_ffn(x, jnp.where(mine, slots + offset, 0), jnp.where(mine, weights, 0.0), view,
                       out_dtype=jnp.float32, kernel=kernel)
        return jax.lax.psum(y, mp.axis)

    layer = mp.layer if stacked else jnp.int32(0)
    # A pallas_call's outputs carry no varying-axes type, which shard_map's check requires (jax asks for
    # check_vma=False there); the xla formulation keeps the check.
    run = jax.shard_map(local, mesh=mp.mesh, in_specs=(P(), P(), P(), P(), jax.tree.map(lambda _: block, mp.pool),
                                                         P()), out_specs=P(), check_vma=kernel == "xla")
    return run(x, experts, slots, weights, mp.pool, layer).astype(x.dtype)
