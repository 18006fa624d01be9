"""Cache-aware routing inside the device step: the layer mode's rule (ef_jax.cache.routing.cache_aware) as array
operations, applied to the router's choice before the layer's demand loads.

[logits f32[N, E], experts i32[N, K], weights f32[N, K], resident bool[E]] → family probabilities → for each
choice, weakest first: not resident → the best resident expert the token has not chosen, if its probability is
within δ of the choice's → renormalised weights for the changed rows (others keep the router's, bit for bit)

Axes: N tokens, E experts, K top-k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ef_jax.models.moe import Routing


def family_probs(cfg, logits):
    """f32[N, E]: the probabilities the family's top-k is taken over (DeepSeek's group limit applied)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if cfg.topk_method == "group_limited_greedy":
        N, E = probs.shape
        grouped = probs.reshape(N, cfg.n_group, E // cfg.n_group)
        _, best = jax.lax.top_k(grouped.max(axis=-1), cfg.topk_group)
        keep = (best[:, :, None] == jnp.arange(cfg.n_group)).any(1)            # bool[N, G]
        probs = jnp.where(keep[:, :, None], grouped, 0.0).reshape(N, E)
    return probs


def cache_aware(cfg, routing: Routing, resident, tolerance: float, real) -> tuple[Routing, jax.Array]:
    """Routing with non-resident choices swapped for resident experts within `tolerance` (see the module
    docstring); real bool[N]: only real tokens are rewritten. Returns (routing, changed bool[N])."""
    p = family_probs(cfg, routing.logits)                                       # f32[N, E]
    N, K = routing.experts.shape
    E = p.shape[1]
    out = routing.experts
    order = jnp.argsort(jnp.take_along_axis(p, out, axis=1), axis=1, stable=True)  # weakest choice first
    chosen = (out[:, :, None] == jnp.arange(E)).any(1)                          # bool[N, E]
    changed = jnp.zeros(N, bool)
    rows = jnp.arange(N)
    for i in range(K):
        c = order[:, i]
        e = out[rows, c]                                                        # i32[N]
        pe = p[rows, e]
        cand = resident[None] & ~chosen & (p > 0) & (p >= (pe - jnp.float32(tolerance))[:, None])
        r = jnp.argmax(jnp.where(cand, p, -1.0), axis=1).astype(jnp.int32)     # ties: the lower id
        do = real & ~resident[e] & cand.any(1)
        new = jnp.where(do, r, e)
        out = out.at[rows, c].set(new)
        chosen = jnp.where(do[:, None], (chosen & (jnp.arange(E) != e[:, None])) | (jnp.arange(E) == r[:, None]),
                           chosen)
        changed = changed | do
    w = jnp.take_along_axis(p, out, axis=1)
    if cfg.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    w = w * cfg.routed_scaling_factor
    weights = jnp.where(changed[:, None], w, routing.weights)
    return Routing(logits=routing.logits, experts=out, weights=weights), changed
