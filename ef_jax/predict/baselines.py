"""History/token-id baselines for predicting a token's experts at every MoE layer, and recall@K.

fit(train trace) → scores(trace) f32[N, L, E]: for token n, a score per expert at each layer using only what is
known before the token is processed (its token id, earlier tokens' routes) → top-K → recall@K vs the real route.

Axes: N tokens, L MoE layers, E experts, K experts routed per token.
The same `fit` / `scores` shape is what a learned predictor provides, so they are evaluated side by side.
"""
from __future__ import annotations

import numpy as np

from ef_jax.trace import RoutingTrace


def _onehot_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts i[N, L, K] → f32[N, L, E] with 1 where the expert was routed."""
    N, L, K = experts.shape
    out = np.zeros((N, L, num_experts), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


def recall_at_k(scores: np.ndarray, experts: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-layer mean of |top-k(scores) ∩ actual| / k. scores f32[N, L, E], experts i[N, L, K] → f32[L]."""
    k = k or experts.shape[-1]
    top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]                      # [N, L, k]
    hit = (top[..., :, None] == experts[..., None, :].astype(top.dtype)).any(-1)  # [N, L, k]
    return hit.sum(-1).mean(0) / k


class FrequencyBaseline:
    """Each layer's most used experts in the training trace, for every token."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def fit(self, train: RoutingTrace) -> "FrequencyBaseline":
        self.freq = _onehot_counts(train.experts, self.num_experts).sum(0)  # [L, E]
        self.freq /= max(self.freq.sum(-1).max(), 1.0)
        return self

    def scores(self, trace: RoutingTrace) -> np.ndarray:
        return np.broadcast_to(self.freq, (trace.num_tokens,) + self.freq.shape).copy()


class PreviousTokenBaseline(FrequencyBaseline):
    """The previous token's experts (same prompt); the first token of a prompt falls back to frequency."""

    def scores(self, trace: RoutingTrace) -> np.ndarray:
        out = super().scores(trace) * 1e-3                           # frequency only breaks ties
        prev = _onehot_counts(trace.experts, self.num_experts)
        out[1:] += prev[:-1]
        out[trace.offsets[:-1][trace.offsets[:-1] < trace.num_tokens]] = self.freq  # prompt starts: no history
        return out


class TokenLookupBaseline(FrequencyBaseline):
    """Per token string, the experts it was routed to most often in the training trace (unknown → frequency)."""

    def fit(self, train: RoutingTrace) -> "TokenLookupBaseline":
        super().fit(train)
        onehot = _onehot_counts(train.experts, self.num_experts)
        self.vocab: dict[str, int] = {}
        ids = np.array([self.vocab.setdefault(t, len(self.vocab)) for t in train.token_strings()], np.int64)
        self.table = np.zeros((len(self.vocab),) + onehot.shape[1:], np.float32)  # [V, L, E]
        np.add.at(self.table, ids, onehot)
        return self

    def scores(self, trace: RoutingTrace) -> np.ndarray:
        out = super().scores(trace) * 1e-3
        for n, tok in enumerate(trace.token_strings()):
            v = self.vocab.get(tok)
            if v is not None:
                out[n] += self.table[v]
        return out
