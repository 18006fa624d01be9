"""Step predictors for the predictive policy: the protocol it calls, and the online one it uses by default.

decode → StepPredictor.predict(step token ids i[B]) → f32[B, L, E] (before each step)
         StepPredictor.observe(layer, routed experts)  (route feedback after each layer)

Axes: B rows decoded together, L MoE layers, E experts.

Trained predictors (ef_jax.predict.runtime) implement the same protocol; this file is numpy only, so the policy
layer never imports the predictor's training stack.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class StepPredictor(Protocol):
    """What the predictive policy calls. `predict` gets the ids of the tokens about to be processed (one per row)
    and returns scores (higher = more likely routed) for each row, layer and expert."""

    def reset(self, num_layers: int, num_experts: int) -> None: ...
    def predict(self, token_ids: np.ndarray) -> np.ndarray: ...
    def observe(self, layer: int, experts: Sequence[int]) -> None: ...


class OnlineLookupPredictor:
    """No training: per token id, the experts it was routed to so far in this run (single-row steps), plus the
    previous token's route and global frequency as tie-breakers. The default predictor of `predictive` in the
    engine when no trained predictor is given."""

    def __init__(self, prev_weight: float = 0.5):
        self.prev_weight = prev_weight
        self.table: dict[int, np.ndarray] = {}

    def reset(self, num_layers: int, num_experts: int) -> None:
        self.L, self.E = num_layers, num_experts
        self.freq = np.zeros((num_layers, num_experts), np.float32)       # [L, E] all-time routed counts
        self.prev = np.zeros((num_layers, num_experts), np.float32)       # [L, E] last step's route (one-hot)
        self._ids: np.ndarray | None = None

    def predict(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids).reshape(-1)
        self._ids = ids
        base = self.freq / max(float(self.freq.sum(-1).max()), 1.0) * 1e-3 + self.prev_weight * self.prev
        out = np.repeat(base[None], len(ids), 0)
        for b, t in enumerate(ids):
            row = self.table.get(int(t))
            if row is not None:
                out[b] += row / max(float(row.sum(-1).max()), 1.0)
        self.prev = np.zeros_like(self.prev)
        return out

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        exps = np.asarray(list(experts), np.int64)
        self.freq[layer, exps] += 1
        self.prev[layer, exps] = 1
        if self._ids is not None and len(self._ids) == 1:  # a union over rows belongs to no single token
            row = self.table.setdefault(int(self._ids[0]), np.zeros((self.L, self.E), np.float32))
            row[layer, exps] += 1
