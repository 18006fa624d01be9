"""Random-weight models of real shapes (benchmarks), built straight in our param layout — no checkpoint files.

`presets()` gives ModelConfigs shaped like public checkpoints (fewer layers where the host could not hold them).
`python -m ef_jax.random_model --help` writes such a model as a Hugging Face checkpoint (ef_jax.random_checkpoint).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.checkpoint import DTYPES, expected_shapes, expert_shapes, set_dotted
from ef_jax.config import ModelConfig, RopeConfig
from ef_jax.model import Model, as_rows


def presets(num_layers: int = 4) -> dict[str, ModelConfig]:
    """Expert shapes of public MoE checkpoints; `num_layers` decoder layers, all MoE."""
    def gqa(family, D, H, Hkv, Dh, E, K, F, V=32000, **kw):
        return ModelConfig(family=family, vocab_size=V, hidden_size=D, num_layers=num_layers, num_heads=H,
                           num_kv_heads=Hkv, head_dim=Dh, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6, dim=Dh),
                           tie_word_embeddings=False, attn_scale=Dh ** -0.5, sliding_windows=(None,) * num_layers,
                           moe_layers=(True,) * num_layers, num_experts=E, top_k=K, moe_intermediate=F, **kw)
    ds = ModelConfig(family="deepseek_v2", vocab_size=32000, hidden_size=2048, num_layers=num_layers, num_heads=16,
                     num_kv_heads=16, head_dim=192, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e4, dim=64, interleaved=True),
                     tie_word_embeddings=False, attention="mla", kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, attn_scale=192 ** -0.5, sliding_windows=(None,) * num_layers,
                     moe_layers=(True,) * num_layers, num_experts=64, top_k=6, moe_intermediate=1408,
                     shared_intermediate=2816, router_fp32_weight=True)
    return {
        "deepseek-v2-lite": ds,
        "olmoe": gqa("olmoe", 2048, 16, 16, 128, 64, 8, 1024, qk_norm="full"),
        "mixtral": gqa("mixtral", 4096, 32, 8, 128, 8, 2, 14336, norm_topk_prob=True),
        "tiny": gqa("qwen3_moe", 64, 4, 2, 16, 8, 2, 32, V=256, qk_norm="head", norm_topk_prob=True),
    }


def random_model(cfg: ModelConfig, *, dtype: str = "float32", seed: int = 0) -> Model:
    """Normal(0, 0.02) weights (norm scales = 1), experts on the host like a loaded checkpoint."""
    rng = np.random.default_rng(seed)
    np_dtype = DTYPES[dtype]

    def draw(shape, name=""):
        if name.endswith("norm"):
            return np.ones(shape, np_dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

    params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
    for name, shape in expected_shapes(cfg).items():
        set_dotted(params, name, draw(shape, name))
    experts = tuple({k: draw(s) for k, s in expert_shapes(cfg).items()} if cfg.moe_layers[i] else None
                    for i in range(cfg.num_layers))
    return Model(config=cfg, params=jax.tree.map(jnp.asarray, params), experts=as_rows(experts), dtype=dtype)


def with_layers(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    return dataclasses.replace(cfg, num_layers=num_layers, moe_layers=(True,) * num_layers,
                               sliding_windows=(None,) * num_layers)


if __name__ == "__main__":
    import sys

    from ef_jax.random_checkpoint import main
    sys.exit(main())
