"""Pre-gating: predict the next MoE layers' experts by applying their routers to the current hidden state.

[on_hidden(layer j, h)] → for s = 1..distance: top-k(softmax(rms_norm(h, norm_{j+s}) · router_{j+s})) → prefetch
eviction: LRU (a prefetched expert enters as most recent).

distance=1 is mixtral-offloading's speculative loading; the ExpertFlow policies build on it. Needs the model's
router weights and the engine's hidden states, so it runs in the engine only (the simulator has no hidden states).

Axes: B batch, D model, E experts, K top-k, j MoE layer index (0..L_moe-1).
"""
from __future__ import annotations

import numpy as np

from ef_jax.policies.classic import LRU


class Pregate(LRU):
    """Prefetch the experts that layers j+1..j+distance's routers pick for layer j's output hidden state."""
    name = "pregate"
    wants_hidden = True

    def __init__(self, routers: list[np.ndarray] | None = None, norms: list[np.ndarray] | None = None, *,
                 top_k: int = 0, eps: float = 1e-6, distance: int = 1):
        if routers is None or norms is None:
            raise ValueError("policy 'pregate' needs the model's routers and hidden states: use it in the engine "
                             "(OffloadConfig(policy='pregate')), not in the trace simulator")
        if distance < 1:
            raise ValueError(f"distance={distance} must be ≥ 1")
        self.routers = [np.asarray(r, np.float32) for r in routers]   # per MoE layer: [D, E]
        self.norms = [np.asarray(n, np.float32) for n in norms]       # per MoE layer: FFN-input RMSNorm scale [D]
        self.top_k, self.eps, self.distance = top_k, eps, distance

    @classmethod
    def from_model(cls, model, distance: int = 1) -> "Pregate":
        cfg, layers = model.config, model.params["layers"]
        ids = cfg.moe_layer_ids
        return cls([np.asarray(layers[i]["mlp"]["router"]) for i in ids],
                   [np.asarray(layers[i]["mlp_norm"]) for i in ids], top_k=cfg.top_k, eps=cfg.rms_norm_eps,
                   distance=distance)

    def predict(self, layer: int, hidden: np.ndarray) -> dict[int, np.ndarray]:
        """target MoE layer → predicted experts (union over rows) for hidden [B, D] of layer `layer`."""
        out = {}
        h = hidden.astype(np.float32)
        for target in range(layer + 1, min(layer + 1 + self.distance, len(self.routers))):
            x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.eps) * self.norms[target]
            logits = x @ self.routers[target]                                        # [B, E]
            top = np.argpartition(-logits, self.top_k - 1, axis=-1)[:, :self.top_k]  # softmax keeps the order
            out[target] = np.unique(top)
        return out

    def on_hidden(self, layer: int, hidden: np.ndarray, view) -> list[tuple[int, int]]:
        last = hidden[:, -1] if hidden.ndim == 3 else hidden  # [B, D]: the newest position of every row
        return [(t, int(e)) for t, experts in self.predict(layer, last).items() for e in experts]
