"""ExpertFlow predictive expert cache (arXiv 2410.17954): prefetch the predicted route, correct misses on demand.

[on_step_start] → scores f32[B, L, E] (a StepPredictor, or precomputed per-token scores in the simulator)
               → want[l] = ∪ over rows of the top-m experts at layer l
               → prefetch want[0..h-1] now; on_route(l) → prefetch want[l+h]   (h = horizon, in layers)
[victim]       → a resident expert NOT predicted for this step's layer first, LRU among the rest
[miss]         → the needed, unpredicted expert loads on demand (the cache's ordinary path: the "correction")

Axes: N tokens, B rows per step, L MoE layers, E experts per layer, S slots per layer, K routed experts per token,
m experts prefetched per layer and row.

Prefetches go out a few layers ahead rather than all at step start: on one FIFO copy stream, a demand load for
a mispredicted expert at layer l would otherwise wait behind the prefetches of every later layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ef_jax.policies.base import BasePolicy, PolicyContext, Recency
from ef_jax.policies.step_predictor import OnlineLookupPredictor


class Predictive(BasePolicy):
    """Args:
        predictor: a StepPredictor (ef_jax.policies.step_predictor): predict(token ids i[B]) → f32[B, L, E] before
            each step, observe(layer, experts) after each layer is routed. Used in the engine.
        scores: f32[N, L, E] precomputed scores, row n = the n-th token the cache will see (the simulator,
            where steps take `batch_size` consecutive tokens). Exactly one of predictor / scores.
        prefetch: m, experts per layer and row to prefetch (default top_k).
        top_k: K of the model (default: m when given, else 1).
        horizon: h, how many layers ahead prefetches are issued (default 2; ≥ L issues all at step start).
        threshold: when set, only experts scoring above it are predicted (for logits: log(p / (1 - p)) keeps
            the experts with predicted probability > p): fewer wasted copies when the predictor is unsure.
        batch_size: tokens per step for `scores`.
    """
    name = "predictive"

    def __init__(self, predictor=None, scores: np.ndarray | None = None, *, prefetch: int | None = None,
                 top_k: int | None = None, horizon: int = 2, threshold: float | None = None, batch_size: int = 1):
        if (predictor is None) == (scores is None):
            raise ValueError("policy 'predictive' needs exactly one of predictor= (a StepPredictor, engine) or "
                             "scores= (f32[N, L, E] precomputed per token, simulator)")
        if scores is not None:
            scores = np.asarray(scores, np.float32)
            if scores.ndim != 3:
                raise ValueError(f"scores must be f32[N, L, E], got shape {list(scores.shape)}")
        if horizon < 1 or batch_size < 1:
            raise ValueError(f"horizon={horizon} and batch_size={batch_size} must be ≥ 1")
        self.predictor, self.scores = predictor, scores
        self.top_k = top_k or prefetch or 1
        self.prefetch_k = prefetch or self.top_k
        self.horizon, self.threshold, self.batch_size = horizon, threshold, batch_size

    @classmethod
    def from_context(cls, context: PolicyContext | None, predictor=None, scores=None, **kw) -> "Predictive":
        """A trained StepPredictor, precomputed scores, or predictor="online": a fresh OnlineLookupPredictor (an
        online lookup table, built per run). The bare name, with neither, is an online lookup too; the engine's
        support table (ef_jax.cache.support) refuses it there, as README says predictive needs a predictor."""
        if predictor == "online" or (predictor is None and scores is None):
            predictor = OnlineLookupPredictor()
        if context is not None and context.top_k and "top_k" not in kw:
            kw["top_k"] = context.top_k
        return cls(predictor, scores, **kw)

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        self.recency = Recency(num_layers, num_experts)
        if self.scores is not None and self.scores.shape[1:] != (num_layers, num_experts):
            raise ValueError(f"scores have [L, E] = {list(self.scores.shape[1:])} but the cache has "
                             f"[{num_layers}, {num_experts}]")
        if self.predictor is not None:
            self.predictor.reset(num_layers, num_experts)
        self.want: list[list[int]] = [[] for _ in range(num_layers)]  # per layer: predicted experts, best first
        self._want_set = [frozenset() for _ in range(num_layers)]
        self.predicted = self.predicted_used = 0                      # counters: prediction precision

    # ---- predictions ----------------------------------------------------------------------------------------
    def _step_scores(self, step: int, token_ids) -> np.ndarray:
        if self.scores is not None:
            t0 = step * self.batch_size
            if t0 >= len(self.scores):
                raise RuntimeError(f"predictive: step {step} is past the precomputed scores ({len(self.scores)} "
                                   f"tokens, {self.batch_size} per step)")
            return self.scores[t0:t0 + self.batch_size]
        if token_ids is None:
            raise RuntimeError("predictive: the engine gave no token ids at step start; the predictor needs them")
        return np.asarray(self.predictor.predict(np.asarray(token_ids)), np.float32)

    def _plan(self, scores: np.ndarray) -> None:
        """want[l] = ∪ over rows of each row's top-m at layer l (above the threshold, if any), ordered by the best
        score among the rows, at most S."""
        B, L, E = scores.shape
        m = min(self.prefetch_k, E, self.slots_per_layer)
        top = np.argpartition(-scores, m - 1, axis=-1)[..., :m]                      # [B, L, m]
        best = np.full((L, E), -np.inf, np.float32)
        rows, layers = np.arange(B)[:, None, None], np.arange(L)[None, :, None]
        np.maximum.at(best, (np.broadcast_to(layers, top.shape), top), scores[rows, layers, top])
        for l in range(L):
            chosen = np.flatnonzero(best[l] > (-np.inf if self.threshold is None else self.threshold))
            chosen = chosen[np.argsort(-best[l, chosen], kind="stable")][:self.slots_per_layer]
            self.want[l] = chosen.tolist()
            self._want_set[l] = frozenset(self.want[l])

    def _requests(self, layer: int) -> list[tuple[int, int]]:
        if layer >= self.num_layers:
            return []
        return [(layer, e) for e in self.want[layer]]

    # ---- hooks ----------------------------------------------------------------------------------------------
    def on_step_start(self, step: int, token_ids, view) -> list[tuple[int, int]]:
        self._plan(self._step_scores(step, token_ids))
        return [r for l in range(min(self.horizon, self.num_layers)) for r in self._requests(l)]

    def on_route(self, layer: int, experts: Sequence[int], view) -> list[tuple[int, int]]:
        want = self._want_set[layer]
        self.predicted += len(want)
        self.predicted_used += sum(1 for e in experts if e in want)
        if self.predictor is not None:
            self.predictor.observe(layer, experts)
        return self._requests(layer + self.horizon)

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        if layer > view.layer:  # not yet routed this step: keep what the prediction says it will need
            unpredicted = [e for e in candidates if e not in self._want_set[layer]]
            if unpredicted:
                candidates = unpredicted
        return self.recency.oldest(layer, candidates)

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        if kind == "prefetch":  # a prefetched expert enters as most recent, else it would be evicted first
            self.recency.touch(layer, expert)

    @property
    def precision(self) -> float:
        """Fraction of predicted (layer, expert) pairs that the step then used."""
        return self.predicted_used / max(self.predicted, 1)
