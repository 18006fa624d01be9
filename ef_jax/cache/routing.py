"""Host-side routing rewrites applied by the offload engine between the router and the expert compute.

[router logits f32[N, E], top-k i32[N, K]] → cache_aware(...) | trace override → (experts, weights) → experts

Axes: N tokens, E experts, K top-k.

* Cache-aware routing (ExpertFlow, arXiv 2510.26730; opt-in, changes outputs): a chosen expert that is not resident
  is swapped for the best-scoring resident expert the token did not already choose, when that expert's router
  probability is within δ of the chosen one's. Probabilities are the family's (softmax in float32, DeepSeek's
  group limit applied), and the new top-k weights are renormalised and scaled exactly as the family's router does.
  Rows with no substitution keep the device's weights bit for bit, so δ = 0 changes nothing.
* Routing override (benchmarks only): replace the router's choice by a recorded trace, so a random-weight model of
  a real shape sees real routing (weights from its own router probabilities at the replayed experts).
"""
from __future__ import annotations

import numpy as np

from ef_jax.config import ModelConfig


def router_probs(cfg: ModelConfig, logits: np.ndarray) -> np.ndarray:
    """f32[N, E] probabilities the family's top-k is taken over (softmax; DeepSeek group limit → 0 outside)."""
    z = logits.astype(np.float32)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = z / z.sum(axis=-1, keepdims=True)
    if cfg.topk_method == "group_limited_greedy":
        N, E = probs.shape
        grouped = probs.reshape(N, cfg.n_group, E // cfg.n_group)
        best = np.argsort(-grouped.max(axis=-1), axis=-1, kind="stable")[:, :cfg.topk_group]
        keep = np.zeros((N, cfg.n_group), bool)
        np.put_along_axis(keep, best, True, axis=-1)
        probs = np.where(keep[:, :, None], grouped, 0.0).reshape(N, E)
    return probs


def family_weights(cfg: ModelConfig, probs: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """f32[N, K] combine weights of `experts` i32[N, K] under the family's renormalisation and scaling."""
    w = np.take_along_axis(probs, experts, axis=-1).astype(np.float32)
    if cfg.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return (w * np.float32(cfg.routed_scaling_factor)).astype(np.float32)


def cache_aware(cfg: ModelConfig, logits: np.ndarray, experts: np.ndarray, resident: np.ndarray, tolerance: float,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Prefer resident experts within `tolerance` of the router's choice.

    Args:
        logits: f32[N, E] raw router logits; experts: i32[N, K] the router's top-k.
        resident: bool[E] experts resident at this layer (arrived or in flight: either costs no new copy).
        tolerance: δ ≥ 0, an absolute router-probability difference.
        rows: bool[N] rows to rewrite (real tokens); default all.
    Returns:
        (experts i32[N, K], weights f32[N, K] for the changed rows (None when none changed), changed bool[N]).
    """
    N, K = experts.shape
    changed = np.zeros(N, bool)
    out = experts.copy()
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be ≥ 0")
    if not resident.any() or resident[experts].all():
        return out, None, changed
    probs = router_probs(cfg, logits)
    res_ids = np.flatnonzero(resident)
    for n in range(N):
        if rows is not None and not rows[n]:
            continue
        p = probs[n]
        chosen = set(out[n].tolist())
        for k in np.argsort(p[out[n]], kind="stable"):  # weakest choice first: it is the cheapest to give up
            e = int(out[n, k])
            if resident[e]:
                continue
            cands = [r for r in res_ids.tolist() if r not in chosen and p[r] > 0 and p[r] >= p[e] - tolerance]
            if not cands:
                continue
            r = max(cands, key=lambda c: (p[c], -c))
            out[n, k] = r
            chosen.discard(e)
            chosen.add(r)
            changed[n] = True
    if not changed.any():
        return out, None, changed
    return out, family_weights(cfg, probs, out), changed
