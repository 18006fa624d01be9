"""Tiny random Hugging Face MoE checkpoints for parity tests: one builder per family, several variants each.

Each variant is (family, name, config kwargs); `save_tiny(variant, dir)` builds the model with seeded torch and
writes it with save_pretrained, so ef_jax reads exactly what a user's checkpoint directory holds.
"""
from __future__ import annotations

import os

V = 96  # vocabulary of every tiny model

_GQA = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)
# Variants whose layers are all MoE have two: still a next MoE layer to prefetch for and to chain into, and the
# offloaded engine compiles a third fewer program variants than with three (most of a CPU test run is compiling).
# Variants with dense layers keep three: dense before / between / after MoE layers (qwen2moe-norm-sparse-step: dense,
# MoE, dense; the dense-first ones: dense, MoE, MoE), and a ragged last group at layers_per_group=2 (test_parity).
_ALL_MOE = dict(_GQA, num_hidden_layers=2)

VARIANTS = {
    "mixtral-top2": ("mixtral", dict(_ALL_MOE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-top1-window": ("mixtral", dict(_ALL_MOE, intermediate_size=24, num_local_experts=4,
                                            num_experts_per_tok=1, sliding_window=5)),
    "qwen2moe-shared": ("qwen2_moe", dict(_ALL_MOE, intermediate_size=40, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2)),
    "qwen2moe-norm-sparse-step": ("qwen2_moe", dict(_GQA, intermediate_size=40, moe_intermediate_size=16,
                                                    shared_expert_intermediate_size=24, num_experts=6,
                                                    num_experts_per_tok=3, norm_topk_prob=True,
                                                    decoder_sparse_step=2, mlp_only_layers=[2])),
    "qwen3moe-norm": ("qwen3_moe", dict(_ALL_MOE, head_dim=8, intermediate_size=40, moe_intermediate_size=16,
                                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen3moe-top1-dense0": ("qwen3_moe", dict(_GQA, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                               num_experts=4, num_experts_per_tok=1, mlp_only_layers=[0])),
    "olmoe": ("olmoe", dict(_ALL_MOE, intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "olmoe-norm-clip": ("olmoe", dict(_ALL_MOE, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                      norm_topk_prob=True, clip_qkv=0.5)),
    "deepseek-qlora-none": ("deepseek_v2", dict(
        _GQA, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1)),
    "deepseek-qlora-grouped-yarn": ("deepseek_v2", dict(
        _GQA, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
}


def hf_config(name: str):
    import transformers
    family, kwargs = VARIANTS[name]
    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "olmoe": transformers.OlmoeConfig,
           "deepseek_v2": transformers.DeepseekV2Config}[family]
    return cls(**kwargs)


def save_tiny(name: str, directory: str, seed: int = 0):
    """Builds variant `name` with seeded random weights, saves it to `directory`, returns the torch model."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name)).eval()
    with torch.no_grad():  # default init is tiny (std 0.02): widen it so routing and logits are not near-ties
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return model
