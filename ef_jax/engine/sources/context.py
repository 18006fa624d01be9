"""What the engine hands a policy about the model: a PolicyContext of host arrays, built once per model.

model params (device) → host numpy: routers f32[L, D, E], FFN-input norms f32[L, D], embedding table [V, D]

Axes: L MoE layers, D model, E experts, V vocabulary.
A policy never reads a device array; the one device→host copy of what it may use happens here.
"""
from __future__ import annotations

import numpy as np

from ef_jax.engine.transfer import residency
from ef_jax.model import Model
from ef_jax.policies.base import PolicyContext


class HostTable:
    """A device table copied to the host on first use (most policies never read the embeddings)."""

    def __init__(self, device_array):
        self._device, self._host = device_array, None

    def __array__(self, dtype=None, copy=None):
        if self._host is None:
            self._host = np.asarray(self._device)
            self._device = None
        return self._host if dtype is None else self._host.astype(dtype)

    def __getitem__(self, index):
        return self.__array__()[index]


def policy_context(model: Model) -> PolicyContext:
    """The model's PolicyContext (cached per model: the embedding table is copied to the host once)."""
    def build():
        cfg, layers = model.config, model.params["layers"]
        ids = cfg.moe_layer_ids
        return PolicyContext(routers=[np.asarray(layers[i]["mlp"]["router"], np.float32) for i in ids],
                             norms=[np.asarray(layers[i]["mlp_norm"], np.float32) for i in ids],
                             embed=HostTable(model.params["embed"]), top_k=cfg.top_k, eps=cfg.rms_norm_eps)
    return residency.cached(model, "context", build)
