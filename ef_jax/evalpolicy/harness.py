"""Teacher-forced token-by-token decoding through the offload engine: cache and prefetch quality, stall and
perplexity of a policy on real text.

[text] → token ids → B sequences of ≤ seq_len tokens → engine.decode.teacher_forced through one Forward (one step =
one token per row, as in decoding) → log p(token t+1) → perplexity; engine stats → hit rate, bytes, stall,
prefetch precision / recall, mean horizon

Axes: B rows decoded together, T tokens per sequence, V vocabulary.

With OffloadConfig(timing=...) the engine charges copies and compute on the simulator's virtual clock, so the
numbers are deterministic and stand for the preset's hardware (bytes per expert, bandwidth, layer time), not for
the machine running the evaluation. `offload=None` decodes all-resident (the perplexity reference).
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from ef_jax.engine.loop.batch import text_to_ids  # noqa: F401  (re-exported by ef_jax.evalpolicy)
from ef_jax.engine.loop.decode import teacher_forced
from ef_jax.progress import bar
from ef_jax.engine.forward.forward import Forward
from ef_jax.model import Model


@dataclasses.dataclass
class PolicyEval:
    """What one evaluation measured (per-token figures divide by every decoded token of every row)."""
    policy: str
    tokens: int                  # tokens decoded (each one forward step of one row)
    hit_rate: float
    bytes_per_token: float       # host→device bytes per decoded token
    stall_s_per_token: float     # compute waiting for copies (virtual seconds with a timing preset)
    prefetch_precision: float    # prefetches used / prefetches issued (nan without prefetching)
    prefetch_recall: float       # needed experts fetched by prefetch / all needed experts fetched from the host
    mean_horizon: float          # the policy's mean prefetch distance in layers (0: no prefetching)
    perplexity: float            # teacher-forced, over every predicted token
    nll: float                   # mean negative log-likelihood (nats)
    wall_s: float                # wall-clock seconds of the decode loop
    stats: dict                  # the engine's full stats
    argmax: np.ndarray = dataclasses.field(repr=False, default=None)  # i32[rows, T-1] greedy next-token choices
    routing: np.ndarray = dataclasses.field(repr=False, default=None)  # i32[steps·B, L, K] routed, step order

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("stats", "argmax", "routing")}
        d["stats"] = {k: v for k, v in self.stats.items() if not isinstance(v, list)}
        return d


def split_sequences(ids: list[int], seq_len: int, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """The token stream → groups of `batch_size` sequences of equal length ≤ seq_len: i32[B, T] each."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be ≥ 2 (one token in, one to predict)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1")
    ids = list(ids)[:max_tokens] if max_tokens else list(ids)
    T = min(seq_len, len(ids) // batch_size)
    if T < 2:
        raise ValueError(f"{len(ids)} tokens are too few for batch_size={batch_size} (need ≥ 2 per row)")
    n_groups = len(ids) // (T * batch_size)
    arr = np.asarray(ids[:n_groups * T * batch_size], np.int32)
    return list(arr.reshape(n_groups, batch_size, T))


def evaluate_policy(model: Model, token_ids: list[int], offload=None, *, batch_size: int = 1, seq_len: int = 256,
                    max_tokens: int | None = None, route_override=None) -> PolicyEval:
    """Teacher-forced decoding of `token_ids` (one stream, split into rows) through `offload` (None: resident).
    route_override (benchmarks only): see ef_jax.engine.sources.base.RouteOverride; refused where the source
    cannot honour it (ef_jax.cache.support)."""
    groups = split_sequences(token_ids, seq_len, batch_size, max_tokens)
    # every group has the same [B, T]; what the run cannot do is refused here (ef_jax.cache.support)
    with Forward(model, offload, kv_shape=groups[0].shape, route_override=route_override) as fwd:
        t0 = time.perf_counter()
        nlls, argmaxes = [], []
        for seqs in bar(groups, desc="eval-policy", unit="batch"):
            nll, am = teacher_forced(fwd, seqs)
            nlls.append(nll)
            argmaxes.append(am)
        jax.effects_barrier()
        wall = time.perf_counter() - t0
        stats = fwd.stats()
        log = fwd.source.routing_log
        routing = np.concatenate(log) if log else None
    nll = float(np.mean(np.concatenate([n.ravel() for n in nlls])))
    decoded = sum(g.shape[0] * (g.shape[1] - 1) for g in groups)
    return PolicyEval(policy=stats["policy"], tokens=decoded, perplexity=math.exp(nll), nll=nll, wall_s=wall,
                      stats=stats, argmax=np.concatenate(argmaxes), routing=routing, **_cache_metrics(stats, decoded))


def _cache_metrics(s: dict, tokens: int) -> dict:
    if s["policy"] == "resident":  # nothing moves, nothing waits
        return dict(hit_rate=1.0, bytes_per_token=0.0, stall_s_per_token=0.0, prefetch_precision=float("nan"),
                    prefetch_recall=float("nan"), mean_horizon=0.0)
    issued, used, demand = s["cache_prefetch_issued"], s["cache_prefetch_used"], s["cache_demand_loads"]
    horizon = s.get("mean_horizon", 0.0)  # history-only policies do not prefetch: 0
    return dict(hit_rate=s["hit_rate"], bytes_per_token=s["h2d_bytes"] / tokens, stall_s_per_token=s["stall_s"] / tokens,
                prefetch_precision=used / issued if issued else float("nan"),
                prefetch_recall=used / (used + demand) if used + demand else float("nan"), mean_horizon=horizon)
