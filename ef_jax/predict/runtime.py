"""Predictors at run time: a trained routing-path predictor over whole traces or step by step, and an online one.

trace  → TrainedPredictor.scores(trace)                  → f32[N, L, E]  (the baselines' API: evaluation, simulator)
decode → StepPredictor.predict(step token ids i[B])      → f32[B, L, E]  (the predictive policy, before each step)
         StepPredictor.observe(layer, routed experts)     (route feedback: the next step's "previous route")

Axes: B rows decoded together, N tokens, L MoE layers, E experts, K routed experts per token, T context window.

A StepPredictor keeps its own per-row history. With B > 1 the cache reports only the union of a layer's
experts over the rows, which belongs to no single row, so the previous-route input is then left empty.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ef_jax.predict.path_predictor import PAD, PredictorConfig, Vocab, check_cache_shape, make_apply, pack, score_packed
from ef_jax.trace import RoutingTrace


class TrainedPredictor:
    """A trained PathPredictor (cfg, params, vocab), loaded from an `ef-jax train-predictor` directory."""

    def __init__(self, cfg: PredictorConfig, params, vocab: Vocab, meta: dict | None = None):
        self.cfg, self.params, self.vocab, self.meta = cfg, params, vocab, meta or {}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrainedPredictor":
        from ef_jax.predict.train import load_predictor
        return cls(*load_predictor(directory))

    @property
    def name(self) -> str:
        return "path-predictor"

    def fit(self, train: RoutingTrace) -> "TrainedPredictor":
        return self  # already trained: the baselines' fit/scores API

    def scores(self, trace: RoutingTrace, context: int | None = None) -> np.ndarray:
        """f32[N, L, E] logits for every token of `trace` (each sees its prompt's earlier tokens and routes, in
        pieces of `context` tokens, default the training window)."""
        self._check(trace)
        packed = pack(self.vocab.encode(trace.token_strings(), self.cfg.ngram_buckets), trace.experts, trace.offsets,
                      context or self.cfg.window)
        return score_packed(self.cfg, self.params, packed)

    def stepper(self, id_to_token: Callable[[int], str] = str, context: int | None = None, *,
                incremental: bool = True):
        """A StepPredictor; `id_to_token` maps the model's token ids to the strings the vocabulary holds (a
        tokenizer's convert_ids_to_tokens; `str` for traces that store ids as decimal strings). `context`: how many
        recent tokens each prediction reads (default the training window; ALiBi needs no change).
        incremental=True (default): one position per step with a key/value cache (ef_jax.predict.incremental);
        False: re-run the whole window every step (PathStepPredictor, the reference)."""
        if incremental:
            from ef_jax.predict.incremental import IncrementalStepPredictor
            return IncrementalStepPredictor(self, id_to_token, context)
        return PathStepPredictor(self, id_to_token, context)

    def _check(self, trace: RoutingTrace) -> None:
        L, K = trace.experts.shape[1:]
        if L != self.cfg.num_layers or int(trace.experts.max(initial=0)) >= self.cfg.num_experts:
            raise ValueError(f"trace has {L} layers and expert ids up to {int(trace.experts.max(initial=0))}, but "
                             f"the predictor was trained for {self.cfg.num_layers} layers × "
                             f"{self.cfg.num_experts} experts: use a predictor trained on this model's traces")


class PathStepPredictor:
    """Step-by-step use of a TrainedPredictor: the last T tokens of each row (and their routes) → one forward."""

    def __init__(self, tp: TrainedPredictor, id_to_token: Callable[[int], str] = str, context: int | None = None):
        if context is not None and context < 1:
            raise ValueError(f"context={context} must be ≥ 1")
        self.tp, self.id_to_token = tp, id_to_token
        self.context = context or tp.cfg.window
        self._apply = make_apply(tp.cfg)
        self.reset(tp.cfg.num_layers, tp.cfg.num_experts)

    def reset(self, num_layers: int, num_experts: int) -> None:
        check_cache_shape(self.tp.cfg, num_layers, num_experts)
        self._tokens: list[list[np.ndarray]] | None = None  # per row: encoded tokens (id [+ trigrams]), oldest first
        self._routes: list[list[np.ndarray]] = []     # per row: i32[L, K] route of each token (-1 = unknown)
        self._current: list[list[int]] = [[] for _ in range(num_layers)]  # the step's observed route so far

    def predict(self, token_ids: np.ndarray) -> np.ndarray:
        cfg = self.tp.cfg
        ids = np.asarray(token_ids).reshape(-1)
        B, T, L, K = len(ids), self.context, cfg.num_layers, cfg.top_k
        if self._tokens is None or len(self._tokens) != B:  # a new batch: fresh histories
            self._tokens, self._routes = [[] for _ in range(B)], [[] for _ in range(B)]
        elif self._tokens[0]:  # the previous step's route (known exactly only for a single row)
            route = np.full((L, K), -1, np.int32)
            if B == 1:
                for l, exps in enumerate(self._current):
                    route[l, :min(K, len(exps))] = exps[:K]
            for r in self._routes:
                r.append(route)
        self._current = [[] for _ in range(L)]
        vocab_ids = self.tp.vocab.encode([self.id_to_token(int(t)) for t in ids], cfg.ngram_buckets)
        tokens = np.full((B, T) + vocab_ids.shape[1:], PAD, np.int32)
        segment = np.zeros((B, T), np.int32)
        prev = np.full((B, T, L, K), -1, np.int32)
        for b in range(B):
            self._tokens[b].append(vocab_ids[b])
            hist = self._tokens[b][-T:]
            n = len(hist)
            tokens[b, T - n:], segment[b, T - n:] = hist, 1  # right-aligned: the newest token is position T-1
            if n > 1:
                prev[b, T - n + 1:] = np.stack(self._routes[b][-(n - 1):])
            if len(self._tokens[b]) > T:  # the window's first token still had a predecessor
                prev[b, T - n] = self._routes[b][-n]
            del self._tokens[b][:-T], self._routes[b][:-T]
        logits = self._apply(self.tp.params, tokens, segment, prev)
        return np.asarray(logits[:, -1])                                                 # [B, L, E]

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self._current[layer].extend(int(e) for e in experts)
