"""Pre-gating: predict the next MoE layers' experts by applying their routers to the current hidden state.

[on_hidden(layer j, h)] → for s = 1..distance: top-k(softmax(rms_norm(h, norm_{j+s}) · router_{j+s})) → prefetch
eviction: LRU (a prefetched expert enters as most recent).

distance=1 is mixtral-offloading's speculative loading; the ExpertFlow policies reuse its scorer. Needs the model's
router weights and the engine's hidden states, so it runs in the engine only (the simulator has no hidden states).

Axes: B batch, D model, E experts, K top-k, j MoE layer index (0..L_moe-1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ef_jax.policies.base import BasePolicy, PolicyContext, Recency, require_model_context


class PregateScorer:
    """Pre-gate scores: router_t(rms_norm(h, norm_t)) for each target MoE layer t (host numpy)."""
    hidden_point = None  # valid at either point (a trained head fixes the one it learned from)

    def __init__(self, routers: list[np.ndarray], norms: list[np.ndarray], eps: float):
        self.routers = [np.asarray(r, np.float32) for r in routers]   # per MoE layer: [D, E]
        self.norms = [np.asarray(n, np.float32) for n in norms]       # per MoE layer: FFN-input RMSNorm scale [D]
        self.eps = eps

    @classmethod
    def from_context(cls, name: str, context: PolicyContext | None) -> "PregateScorer":
        ctx = require_model_context(name, context)
        return cls(ctx.routers, ctx.norms, ctx.eps)

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def scores(self, layer: int, hidden: np.ndarray, targets: Sequence[int], context: dict) -> dict[int, np.ndarray]:
        """hidden f32[B, D] of MoE layer `layer` → {t: logits f32[B, E]}."""
        h = hidden.astype(np.float32)
        x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return {t: (x * self.norms[t]) @ self.routers[t] for t in targets}

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """(norms f32[L, D], routers f32[L, D, E], eps): what ef_jax.engine.programs.layer.pregate_scores applies on the
        device to compute every layer's scores at once."""
        return np.stack(self.norms), np.stack(self.routers), np.float32(self.eps)


class Pregate(BasePolicy):
    """Prefetch the experts that layers j+1..j+distance's routers pick for layer j's output hidden state."""
    name = "pregate"
    wants_hidden = True

    def __init__(self, scorer: PregateScorer | None = None, *, top_k: int = 0, distance: int = 1):
        if scorer is None:
            require_model_context(self.name, None)
        if distance < 1:
            raise ValueError(f"distance={distance} must be ≥ 1")
        self.scorer, self.top_k, self.distance = scorer, top_k, distance

    @classmethod
    def from_context(cls, context: PolicyContext | None, distance: int = 1) -> "Pregate":
        scorer = PregateScorer.from_context(cls.name, context)
        return cls(scorer, top_k=context.top_k, distance=distance)

    def prefetch_distance(self) -> float:
        return float(self.distance)

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        self.recency = Recency(num_layers, num_experts)

    def predict(self, layer: int, hidden: np.ndarray) -> dict[int, np.ndarray]:
        """target MoE layer → predicted experts (union over rows) for hidden [B, D] of layer `layer`."""
        targets = range(layer + 1, min(layer + 1 + self.distance, self.scorer.num_layers))
        out = {}
        for t, logits in self.scorer.scores(layer, hidden, targets, {}).items():    # [B, E] each
            top = np.argpartition(-logits, self.top_k - 1, axis=-1)[:, :self.top_k]  # softmax keeps the order
            out[t] = np.unique(top)
        return out

    def on_hidden(self, layer: int, hidden: np.ndarray, view) -> list[tuple[int, int]]:
        last = hidden[:, -1] if hidden.ndim == 3 else hidden  # [B, D]: the newest position of every row
        return [(t, int(e)) for t, experts in self.predict(layer, last).items() for e in experts]

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        if kind == "prefetch":
            self.recency.touch(layer, expert)

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        return self.recency.oldest(layer, candidates)
