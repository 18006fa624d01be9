"""The hybrid cross-layer head (ef_jax.hybrid, `train-hybrid`) inside the device step: expertflow's pre-gate scores
plus the head's learned corrections, as array operations at each prediction site.

site j ≥ 0 (MoE layer j's hidden state h_j at the head's point), targets t = j+1 .. j+H' (static):
  hn = rms(h_j) → zpg_t = router_t(hn · norm_t)                           (layer.pregate_scores, the head's routers)
  t − j ≤ d:  logits_t = a_{t−j} · zpg_t + hn W_h + onehot(experts_j) W_c + onehot(previous step's experts_t) W_p
                         + emb(token) W_k + b                            (the (j, t) pair's head)
  t − j > d:  zpg_t                                                       (beyond the trained distance: pre-gating)
site −1 (the step's embeddings): zpg only — the head has no pair from −1, as the host predictor has none.

This is ef_jax.hybrid.predictor.HybridPredictor.scores on the same inputs (tests/engine/test_device_hybrid.py checks
them allclose; tests/sim/test_device_twin.py checks the step's recorded scores against it): experts_j is the union
of the step's real tokens' experts at j (the routing the layer acted on) and the previous step's experts at t its
union at t (PolicyState.prev, zero before the first step), as the host cache's view gives them; token is each row's
newest token id. The head's parameters travel to the device once and into the step as an argument (a pytree);
its layout (HeadSpec) is static, so a step without a head compiles exactly as before.

Axes: L MoE layers, B rows, T new tokens, D model, E experts, C token-embedding width, V vocabulary, H' targets of
a site, P' the head's pairs kept on the device ((j, t) with 1 ≤ t − j ≤ d, j-major, t ascending).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.engine.programs.layer import newest_normed, pregate_scores

POINTS = ("attention", "moe")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The static side of a hybrid head on the device (part of the DevicePolicy: hashable)."""
    distance: int   # d: pairs with t − j ≤ d run the head (min(its max_distance, H_max)); beyond: pre-gating
    point: str      # the hidden state a site reads: "attention" (MoE input) or "moe" (layer output), the record's

    def __post_init__(self):
        if self.distance < 1:
            raise ValueError(f"HeadSpec distance={self.distance} must be ≥ 1")
        if self.point not in POINTS:
            raise ValueError(f"HeadSpec point={self.point!r} must be one of {POINTS}")


def head_spec(predictor, max_horizon: int) -> HeadSpec:
    """The HeadSpec of a HybridPredictor scored up to max_horizon layers ahead (its record's hidden-state point)."""
    return HeadSpec(distance=min(predictor.cfg.max_distance, max_horizon), point=predictor.cfg.point)


def pair_start(num_layers: int, distance: int, j: int) -> int:
    """Index in the P' layout of site j's first pair (j, j + 1): the pairs of the sites before it."""
    return sum(min(distance, num_layers - 1 - i) for i in range(j))


def head_args(predictor, spec: HeadSpec, num_layers: int, num_experts: int, hidden: int):
    """A HybridPredictor's arrays for the device (host numpy; the caller puts them on the device once):
    (scorer (norms f32[L, D], routers f32[L, D, E], eps f32[]): the head's own pre-gate routers, for every site
    including −1; head {a f32[d], wh f32[P', D, E], wc f32[P', E, E], wp f32[P', E, E], wk f32[P', C, E],
    b f32[P', E], emb f32[V, C]}). ValueError when the head was trained for another model shape."""
    cfg = predictor.cfg
    if (cfg.num_layers, cfg.num_experts, cfg.hidden) != (num_layers, num_experts, hidden):
        raise ValueError(f"the hybrid head was trained for {cfg.num_layers} MoE layers × {cfg.num_experts} experts, "
                         f"D={cfg.hidden}; this model has {num_layers} × {num_experts}, D={hidden}: train one on "
                         "this model's record (`ef-jax record`, `ef-jax train-hybrid`)")
    keep = [i for i, (j, t) in enumerate(cfg.pairs) if t - j <= spec.distance]  # j-major: a site's pairs adjoin
    assert len(keep) == pair_start(num_layers, spec.distance, num_layers), (len(keep), spec)
    p = {k: np.asarray(v, np.float32) for k, v in predictor.p.items()}
    head = {"a": p["a"][:spec.distance], **{k: p[k][keep] for k in ("wh", "wc", "wp", "wk", "b")}, "emb": p["emb"]}
    scorer = (np.stack(predictor.norms), np.stack(predictor.routers), np.float32(cfg.eps))
    return scorer, head


def head_scores(spec: HeadSpec, scorer, head: dict, hidden, j: int, layers: range, cur, prev, token_ids):
    """Site j's scores for the target layers `layers` (j+1 .. j+H', static): f32[H', B, E].

    hidden [B, T, D] at spec.point (j = −1: the embeddings); cur bool[E] the step's experts at j; prev bool[L, E]
    the previous step's experts at every layer; token_ids i32[B] each row's newest token. The head's sums run in
    the host predictor's order, every matmul at HIGHEST precision (f32 on a GPU too, no TF32)."""
    zpg = pregate_scores(scorer, hidden, layers)                        # f32[H', B, E]
    n = min(len(layers), spec.distance)                                 # targets the head reaches (static)
    if j < 0 or n == 0:
        return zpg
    hi = jax.lax.Precision.HIGHEST
    s0 = pair_start(scorer[0].shape[0], spec.distance, j)
    pair = lambda k: head[k][s0:s0 + n]
    hn = newest_normed(hidden, scorer[2])                               # f32[B, D]
    emb = head["emb"][token_ids]                                        # f32[B, C]
    cur_f = cur.astype(jnp.float32)
    prev_f = prev[j + 1:j + 1 + n].astype(jnp.float32)                  # f32[n, E]: the targets' last routes
    near = (head["a"][:n, None, None] * zpg[:n]
            + jnp.einsum("bd,pde->pbe", hn, pair("wh"), precision=hi)
            + jnp.einsum("e,pef->pf", cur_f, pair("wc"), precision=hi)[:, None]
            + jnp.einsum("pe,pef->pf", prev_f, pair("wp"), precision=hi)[:, None]
            + jnp.einsum("bc,pce->pbe", emb, pair("wk"), precision=hi)
            + pair("b")[:, None])
    return near if n == len(layers) else jnp.concatenate([near, zpg[n:]])
