"""The hybrid cross-layer predictor (ExpertFlow, arXiv 2510.26730): pre-gate scores plus a learned linear correction
from intermediate state, one small head per (source layer j, target layer t = j + s), s = 1..S.

logits_{j,t} = a_s · pregate_t(h_j) + norm(h_j) W_h + onehot(experts_j) W_c + onehot(prev token's experts_t) W_p
               + emb(token) W_k + b                                            (per pair; a_s shared per distance)

[Record] → features (pre-gate logits, normalised hidden states, multi-hots) → Adam on multi-label BCE → params
→ recall@K by distance for pre-gate alone vs hybrid, with a·e^(−b s)+c fits

Axes: N tokens, L MoE layers, P (j, t) pairs, D model, E experts, K top-k, V vocabulary, C token-embedding width.
Initialised at a_s = 1 and every correction 0, so an untrained head is exactly pre-gating.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.progress import bar


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    num_layers: int     # L MoE layers
    num_experts: int    # E
    top_k: int          # K
    hidden: int         # D
    vocab: int          # V
    max_distance: int = 8
    token_dim: int = 16
    eps: float = 1e-6
    point: str = "moe"  # the record's hidden-state point: the engine must show the same one at inference

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(source j, target t) with 1 ≤ t − j ≤ max_distance."""
        L, S = self.num_layers, self.max_distance
        return [(j, t) for j in range(L) for t in range(j + 1, min(L, j + 1 + S))]


def init_params(cfg: HybridConfig, seed: int = 0) -> dict:
    P, D, E, C = len(cfg.pairs), cfg.hidden, cfg.num_experts, cfg.token_dim
    key = jax.random.key(seed)
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return {"a": jnp.ones((cfg.max_distance,), jnp.float32),  # f32[S] pre-gate weight per distance
            "wh": z(P, D, E), "wc": z(P, E, E), "wp": z(P, E, E), "wk": z(P, C, E), "b": z(P, E),
            "emb": 0.02 * jax.random.normal(key, (cfg.vocab, C), jnp.float32)}


def rms(h: np.ndarray, eps: float) -> np.ndarray:
    h = h.astype(np.float32)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)


def pregate_logits(cfg: HybridConfig, hn: np.ndarray, routers: list, norms: list) -> np.ndarray:
    """hn f32[N, L, D] (RMS-normalised hidden states) → pre-gate logits f32[N, P, E] for every pair."""
    return np.stack([(hn[:, j] * norms[t]) @ routers[t] for j, t in cfg.pairs], axis=1)


def multi_hot(experts: np.ndarray, E: int) -> np.ndarray:
    """i[N, L, K] → f32[N, L, E]."""
    N, L, _ = experts.shape
    out = np.zeros((N, L, E), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


def features(cfg: HybridConfig, rec, routers: list, norms: list) -> dict:
    """Arrays the head reads, from an ef_jax.hybrid.record.Record."""
    hn = rms(rec.hidden, cfg.eps)
    mh = multi_hot(rec.experts, cfg.num_experts)
    prev = np.zeros_like(mh)
    prev[1:] = mh[:-1]
    prev[rec.offsets[:-1]] = 0.0  # no previous token at a chunk start
    tgt = np.array([t for _, t in cfg.pairs])
    return {"zpg": pregate_logits(cfg, hn, routers, norms), "hn": hn, "cur": mh, "prev": prev[:, tgt],
            "tok": rec.tokens.astype(np.int32), "y": mh[:, tgt]}


def head_logits(params: dict, cfg: HybridConfig, f: dict):
    """f: zpg [N, P, E], hn [N, L, D], cur [N, L, E], prev [N, P, E], tok i32[N] → logits [N, P, E]."""
    dist = np.array([t - j - 1 for j, t in cfg.pairs])
    src = np.array([j for j, _ in cfg.pairs])
    emb = params["emb"][f["tok"]]                                        # [N, C]
    return (params["a"][dist][None, :, None] * f["zpg"]
            + jnp.einsum("npd,pde->npe", f["hn"][:, src], params["wh"])
            + jnp.einsum("npe,pef->npf", f["cur"][:, src], params["wc"])
            + jnp.einsum("npe,pef->npf", f["prev"], params["wp"])
            + jnp.einsum("nc,pce->npe", emb, params["wk"]) + params["b"][None])


def _loss(params, cfg, f, weight_decay):
    z = head_logits(params, cfg, f)
    bce = jnp.mean(jnp.maximum(z, 0) - z * f["y"] + jnp.log1p(jnp.exp(-jnp.abs(z))))
    l2 = sum(jnp.sum(params[k] ** 2) for k in ("wh", "wc", "wp", "wk"))
    return bce + weight_decay * l2


def train(cfg: HybridConfig, f_train: dict, f_val: dict, *, steps: int = 2000, batch: int = 256, lr: float = 3e-3,
          weight_decay: float = 1e-5, seed: int = 0, max_seconds: float | None = None, log=print) -> dict:
    """Adam on BCE; returns the parameters with the best validation loss (checked every 100 steps)."""
    params = init_params(cfg, seed)
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1,))
    val_loss = jax.jit(_loss, static_argnums=(1,))
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    rng = np.random.default_rng(seed)
    N = len(f_train["tok"])
    best, best_params, t0 = math.inf, params, time.perf_counter()
    b1, b2 = 0.9, 0.999
    for step in bar(range(1, steps + 1), desc="training hybrid", unit="step"):
        idx = rng.integers(0, N, min(batch, N))
        loss, g = grad(params, cfg, {k: a[idx] for k, a in f_train.items()}, weight_decay)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        scale = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        params = jax.tree.map(lambda p, m_, v_, c=scale: p - c * m_ / (jnp.sqrt(v_) + 1e-8), params, m, v)
        if step % 100 == 0 or step == steps:
            vl = float(val_loss(params, cfg, f_val, 0.0))
            if vl < best:
                best, best_params = vl, params
            log(f"step {step}: train loss {float(loss):.4f}, val loss {vl:.4f} (best {best:.4f})")
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                log(f"time budget of {max_seconds:.0f} s reached")
                break
    return jax.tree.map(np.asarray, best_params)


def recall_at_k(logits: np.ndarray, y: np.ndarray, K: int) -> np.ndarray:
    """logits, y [N, P, E] → f[P]: mean |top-K(logits) ∩ actual| / K."""
    top = np.argpartition(-logits, K - 1, axis=-1)[..., :K]
    return np.take_along_axis(y, top, axis=-1).sum(-1).mean(0) / K


def recall_by_distance(cfg: HybridConfig, per_pair: np.ndarray) -> list[float]:
    """f[P] → mean over pairs at each distance s = 1..max (nan where no pair has that distance)."""
    dist = np.array([t - j for j, t in cfg.pairs])
    return [float(per_pair[dist == s].mean()) if (dist == s).any() else float("nan")
            for s in range(1, cfg.max_distance + 1)]


def fit_exp_decay(s: np.ndarray, r: np.ndarray) -> dict:
    """Least-squares a·e^(−b s) + c over a grid of b (a, c solved exactly for each b). Needs ≥ 3 points."""
    ok = ~np.isnan(r)
    s, r = np.asarray(s, float)[ok], np.asarray(r, float)[ok]
    if len(s) < 3:
        return {"a": float("nan"), "b": float("nan"), "c": float("nan"), "rmse": float("nan")}
    best = None
    for b in np.geomspace(1e-3, 10, 400):
        X = np.stack([np.exp(-b * s), np.ones_like(s)], axis=1)
        coef, *_ = np.linalg.lstsq(X, r, rcond=None)
        err = float(np.sum((X @ coef - r) ** 2))
        if best is None or err < best[0]:
            best = (err, float(coef[0]), float(b), float(coef[1]))
    err, a, b, c = best
    return {"a": a, "b": b, "c": c, "rmse": math.sqrt(err / len(s))}


def save(directory: str, cfg: HybridConfig, params: dict, report: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "params.npz"), **{k: np.asarray(v) for k, v in params.items()})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


def load(directory: str) -> tuple[HybridConfig, dict]:
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: pass a directory written by `ef-jax train-hybrid`")
    with open(cfg_path) as f:
        cfg = HybridConfig(**json.load(f))
    with np.load(os.path.join(directory, "params.npz")) as z:
        params = {k: z[k] for k in z.files}
    return cfg, params
