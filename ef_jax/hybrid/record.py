"""Records what a hybrid predictor learns from: per token, the hidden state after every MoE layer (the point the
engine's on_hidden hook sees), its routed experts and its token id — captured by the offload engine itself.

[text ids] → chunks of ≤ seq_len → engine.decode.record: one prefill per chunk through the resident Forward with a
hidden-state tap at `point` → hidden [T, D] per MoE layer, routed experts [T, L, K] → .npz

Axes: N tokens (all chunks), L MoE layers, D model, K top-k.
Because the model is causal, the hidden state and routing of position t in a prefill are those a token-by-token
decode of the same text sees, so one prefill per chunk records a whole decode.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ef_jax.model import Model
from ef_jax.progress import bar


@dataclasses.dataclass
class Record:
    hidden: np.ndarray   # f16[N, L, D] hidden state after each MoE layer
    experts: np.ndarray  # i16[N, L, K] routed experts
    tokens: np.ndarray   # i32[N] token ids
    offsets: np.ndarray  # i64[C+1] chunk c owns tokens offsets[c]:offsets[c+1] (no history across chunks)
    routers: np.ndarray  # f32[L, D, E] each MoE layer's router (pre-gating needs no model at training time)
    norms: np.ndarray    # f32[L, D] each MoE layer's FFN-input RMSNorm scale
    vocab: int           # V, the model's vocabulary size
    eps: float           # RMSNorm epsilon
    point: str = "moe"   # where the hidden states were taken: "moe" (layer outputs) or "attention" (MoE inputs)

    FIELDS = ("hidden", "experts", "tokens", "offsets", "routers", "norms", "vocab", "eps", "point")

    def save(self, path: str) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.FIELDS})

    @classmethod
    def load(cls, path: str) -> "Record":
        with np.load(path) as z:
            missing = set(cls.FIELDS) - set(z.files) - {"point"}  # records before `point` are layer outputs
            if missing:
                raise ValueError(f"{path} is not an `ef-jax record` file: it lacks {sorted(missing)}")
            return cls(**{k: z[k] for k in cls.FIELDS[:-3]}, vocab=int(z["vocab"]), eps=float(z["eps"]),
                       point=str(z["point"]) if "point" in z.files else "moe")


def record(model: Model, token_ids: list[int], *, seq_len: int = 256, max_tokens: int | None = None,
           point: str = "moe") -> Record:
    """Runs `token_ids` (one stream, cut into chunks of seq_len) through the engine and records it; `point` is
    where the engine shows hidden states (ef_jax.policies.base: "moe" or "attention")."""
    if point not in ("moe", "attention"):
        raise ValueError(f"point={point!r} must be 'moe' (layer outputs) or 'attention' (MoE inputs)")
    from ef_jax.engine.loop.decode import record as record_chunks
    from ef_jax.engine.forward.forward import Forward
    cfg = model.config
    if not cfg.moe_layer_ids:
        raise ValueError("this model has no MoE layers: there is nothing to record")
    ids = list(token_ids)[:max_tokens] if max_tokens else list(token_ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to record, got {len(ids)}")
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    with Forward(model) as fwd:
        hidden, experts = record_chunks(fwd, bar(chunks, desc="recording", unit="seq"), point)               # [N, L, D], [N, L, K]
    experts = experts.astype(np.int16)
    offsets = np.cumsum([0] + [len(c) for c in chunks]).astype(np.int64)
    layers = [model.params["layers"][i] for i in cfg.moe_layer_ids]
    return Record(hidden=hidden, experts=experts, tokens=np.asarray(ids, np.int32), offsets=offsets,
                  routers=np.stack([np.asarray(p["mlp"]["router"], np.float32) for p in layers]),
                  norms=np.stack([np.asarray(p["mlp_norm"], np.float32) for p in layers]), vocab=cfg.vocab_size,
                  eps=cfg.rms_norm_eps, point=point)
