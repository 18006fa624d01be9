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


# ---- random checkpoints on disk (load benchmarks and tests): real shapes, HF names, sharded safetensors ----------

HF_PRESETS = {  # config.json of public checkpoints (weights are random); num_hidden_layers is set by the caller
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                             kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, topk_method="greedy", scoring_func="softmax", moe_layer_freq=1,
                             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                             bos_token_id=0, eos_token_id=1, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, bos_token_id=0,
                          eos_token_id=1, tie_word_embeddings=False),
}


def write_random_checkpoint(hf_config: dict, out_dir: str, *, dtype: str = "bfloat16", shard_bytes: int = 1 << 30,
                            seed: int = 0) -> int:
    """Writes a Hugging Face checkpoint directory of random weights (config.json, sharded safetensors with an index,
    per-expert tensors) for `hf_config`, one shard in memory at a time. Values are windows of one random pool (the
    load path, not the numbers, is what these checkpoints exercise). Returns the bytes written."""
    import json
    import os

    from safetensors.numpy import save_file

    from ef_jax.checkpoint import _expert_names, hf_name_map
    from ef_jax.config import from_hf_config
    cfg = from_hf_config(hf_config)
    np_dtype = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np_dtype)

    def draw(shape, name):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return np.ones(shape, np_dtype)
        n = int(np.prod(shape))
        reps = -(-n // pool.size)
        start = int(rng.integers(0, pool.size))
        return np.resize(np.roll(pool, start), reps * pool.size)[:n].reshape(shape) if reps > 1 else \
            np.roll(pool, start)[:n].reshape(shape).copy()

    shapes = expected_shapes(cfg)
    tensors = [(hf, tuple(reversed(shapes[ours])) if transpose else shapes[ours])
               for ours, (hf, transpose) in hf_name_map(cfg).items()]
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
    for i in cfg.moe_layer_ids:
        moe_pre, proj = _expert_names(cfg, f"model.layers.{i}")
        for j in range(E):
            for ours, hf in proj.items():
                tensors.append((f"{moe_pre}.experts.{j}.{hf}.weight", (F, D) if ours != "down" else (D, F)))
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(list(current))
            save_file(current, os.path.join(out_dir, f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            current, size = {}, 0
        current[name] = draw(shape, name)
        size += nbytes
        total += nbytes
    shards.append(list(current))
    save_file(current, os.path.join(out_dir, f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    del current
    weight_map = {}
    for n, names in enumerate(shards):
        for name in names:
            weight_map[name] = f"shard-{n + 1:05d}.safetensors"
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config, torch_dtype=dtype), f, indent=1)
    return total


if __name__ == "__main__":
    import sys

    from ef_jax.random_checkpoint import main
    sys.exit(main())
