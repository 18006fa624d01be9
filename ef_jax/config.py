"""ModelConfig: the shape and semantics of a Hugging Face MoE checkpoint, read from its config.json.

[config.json] → from_hf_config() → ModelConfig (frozen, hashable: it is a static argument of every jitted step)

Only what changes the computation is kept. Every config feature we do not implement raises
NotImplementedError naming the feature, so an unsupported checkpoint never runs with a silently wrong answer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# model_type in config.json → (our family name, HF architecture class)
SUPPORTED = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


def supported_architectures() -> str:
    return ", ".join(f"{arch} (model_type '{mt}')" for mt, arch in SUPPORTED.items())


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / legacy `rope_scaling`)."""
    theta: float
    dim: int                     # rotated dims per head
    rope_type: str = "default"   # default | linear | yarn
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = False    # DeepSeek-V2 rotates adjacent pairs (complex view); others rotate halves


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a MoE causal LM. Axis names: D model, H heads, Dh head dim, E experts, K top-k,
    F expert FFN width, L layers."""
    family: str                  # one of SUPPORTED keys
    vocab_size: int
    hidden_size: int             # D
    num_layers: int              # L (all decoder layers, dense ones included)
    num_heads: int               # H
    num_kv_heads: int
    head_dim: int                # Dh for q/k/v (GQA); for MLA: qk_nope + qk_rope
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    # attention
    attention: str = "gqa"       # gqa | mla
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None   # None | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full causal
    # MLA (DeepSeek-V2)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attn_scale: float = 0.0      # softmax scale (1/sqrt(Dh), times yarn mscale² for DeepSeek)
    # feed-forward
    dense_intermediate: int = 0  # F of dense (non-MoE) layers
    moe_layers: tuple[bool, ...] = ()  # per layer: True = routed experts
    num_experts: int = 0         # E
    top_k: int = 0               # K
    moe_intermediate: int = 0    # F of one routed expert
    norm_topk_prob: bool = False
    topk_method: str = "greedy"  # greedy | group_limited_greedy
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32_weight: bool = False  # DeepSeek-V2 keeps the router weight (and its matmul) in float32
    shared_intermediate: int = 0  # width of the always-on shared expert(s); 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # positions the model was trained for (config.json max_position_embeddings); None = not stated, no limit
    max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.family not in SUPPORTED:
            raise ValueError(f"family={self.family!r} is not supported; supported: {supported_architectures()}")
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries, expected num_layers={self.num_layers}")
        if any(self.moe_layers) and not (0 < self.top_k <= self.num_experts):
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    # --- derived metadata -------------------------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up: D×F; down: F×D)."""
        return 3 * self.hidden_size * self.moe_intermediate

    def describe(self) -> str:
        return (f"{SUPPORTED[self.family]}: {self.num_layers} layers ({self.num_moe_layers} MoE), D={self.hidden_size}, "
                f"heads={self.num_heads}/{self.num_kv_heads} ({self.attention}), experts={self.num_experts} top-{self.top_k} "
                f"F={self.moe_intermediate}, vocab={self.vocab_size}")


# ---------------------------------------------------------------------------------------------------------------
# HF config.json → ModelConfig


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a Hugging Face checkpoint directory needs config.json "
                                f"(supported: {supported_architectures()})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid UTF-8 JSON ({e}); re-save the checkpoint with "
                         "save_pretrained") from None


def _rope_params(hf: dict) -> dict:
    # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x wrote rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params.update(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            params["rope_type"] = scaling["type"]
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _rope_config(hf: dict, dim: int, interleaved: bool) -> RopeConfig:
    p = _rope_params(hf)
    rope_type = p["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(f"rope type {rope_type!r} is not implemented (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not implemented")
    factor = p.get("factor")
    orig = p.get("original_max_position_embeddings") or 0
    if rope_type == "yarn" and factor is None:
        factor = hf["max_position_embeddings"] / orig
    return RopeConfig(
        theta=float(p["rope_theta"]), dim=dim, rope_type=rope_type, factor=float(factor or 1.0),
        original_max_position=int(orig), beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
        mscale=float(p.get("mscale") or 0), mscale_all_dim=float(p.get("mscale_all_dim") or 0),
        attention_factor=p.get("attention_factor"), truncate=bool(p.get("truncate", True)), interleaved=interleaved)


def _reject(hf: dict, key: str, ok, what: str):
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise NotImplementedError(f"config.json {key}={hf[key]!r}: {what} is not implemented")


def _reject_quantized(hf: dict):
    # A quantized checkpoint's tensors are not the bf16/f32 weights the loader reads: refuse it before any tensor is
    # read (bf16 tensors under an fp8 config would otherwise run with a silently different model).
    q = hf.get("quantization_config")
    if q:
        method = (q.get("quant_method") or q.get("quant_type")) if isinstance(q, dict) else None
        method = method or "unknown"
        raise NotImplementedError(
            f"config.json quantization_config (quant_method={method!r}): quantized checkpoints are not implemented; "
            f"use the unquantized (bf16/float32) checkpoint of this model (expert_dtype='int8' or 'int4', "
            f"--expert-dtype on the CLI, quantizes its routed experts at load)")


def _req(hf: dict, *keys: str):
    """The first of `keys` present in config.json (aliases of one field), or a clear error."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise ValueError(f"config.json lacks {' / '.join(keys)} (model_type {hf.get('model_type')!r}); "
                     "re-save the checkpoint with transformers' save_pretrained")


def _eos_ids(hf: dict, gen: dict | None) -> tuple[int, ...]:
    ids = []
    for src in (hf, gen or {}):
        v = src.get("eos_token_id")
        if v is None:
            continue
        ids.extend(v if isinstance(v, list) else [v])
    out = []
    for i in ids:
        if 0 <= int(i) < hf["vocab_size"] and int(i) not in out:
            out.append(int(i))
    return tuple(out)


def from_hf_config(hf: dict[str, Any], generation_config: dict | None = None) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json (plus generation_config.json, for stop tokens)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"model_type={mt!r} is not supported by ef_jax; supported architectures: "
                         f"{supported_architectures()}")
    _reject_quantized(hf)
    _reject(hf, "hidden_act", lambda v: v == "silu", "an activation other than silu")
    _reject(hf, "mlp_bias", lambda v: not v, "mlp_bias=True")
    _reject(hf, "pretraining_tp", lambda v: v == 1, "pretraining_tp != 1")
    n_layers = hf["num_hidden_layers"]
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or H
    common = dict(vocab_size=hf["vocab_size"], hidden_size=D, num_layers=n_layers, num_heads=H, num_kv_heads=kv,
                  rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos_ids(hf, generation_config),
                  pad_token_id=hf.get("pad_token_id"), max_position_embeddings=hf.get("max_position_embeddings"))
    if mt == "deepseek_v2":
        return _deepseek_config(hf, common)
    head_dim = hf.get("head_dim") or D // H
    rope = _rope_config(hf, head_dim, interleaved=False)
    base = dict(common, family=mt, head_dim=head_dim, rope=rope, attn_scale=head_dim ** -0.5,
                dense_intermediate=hf.get("intermediate_size", 0),
                sliding_windows=_sliding_windows(hf, mt, n_layers))
    if mt == "mixtral":
        E = hf["num_local_experts"]
        return ModelConfig(**base, moe_layers=(True,) * n_layers, num_experts=E, top_k=hf["num_experts_per_tok"],
                           moe_intermediate=hf["intermediate_size"], norm_topk_prob=True)
    E = _req(hf, "num_experts", "num_local_experts")
    if mt == "olmoe":
        return ModelConfig(**base, qk_norm="full", clip_qkv=hf.get("clip_qkv"), qkv_bias=bool(hf.get("attention_bias")),
                           o_bias=bool(hf.get("attention_bias")),
                           moe_layers=(True,) * n_layers, num_experts=E, top_k=hf["num_experts_per_tok"],
                           moe_intermediate=hf["intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob")))
    # Qwen2-MoE / Qwen3-MoE: a layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid.
    step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    moe = tuple(i not in dense_only and E > 0 and (i + 1) % step == 0 for i in range(n_layers))
    extra = dict(moe_layers=moe, num_experts=E, top_k=hf["num_experts_per_tok"],
                 moe_intermediate=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob")))
    if mt == "qwen2_moe":
        bias = hf.get("qkv_bias", True)
        return ModelConfig(**base, **extra, qkv_bias=bool(bias),
                           shared_intermediate=hf.get("shared_expert_intermediate_size", 0), shared_expert_gate=True)
    return ModelConfig(**base, **extra, qk_norm="head", qkv_bias=bool(hf.get("attention_bias")),
                       o_bias=bool(hf.get("attention_bias")))


def _sliding_windows(hf: dict, mt: str, n_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if mt == "mixtral":
        return (window,) * n_layers
    if mt == "olmoe":
        return (None,) * n_layers
    layer_types = hf.get("layer_types")
    if layer_types:  # transformers 5: explicit per-layer attention kinds
        bad = set(layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise NotImplementedError(f"layer_types {sorted(bad)} are not implemented")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("use_sliding_window"):
        if mt == "qwen3_moe":
            return (window,) * n_layers
        # Qwen2 legacy rule: layers at index >= max_window_layers slide.
        return tuple(window if i >= hf.get("max_window_layers", n_layers) else None for i in range(n_layers))
    return (None,) * n_layers


def _deepseek_config(hf: dict, common: dict) -> ModelConfig:
    _reject(hf, "moe_layer_freq", lambda v: v == 1, "moe_layer_freq != 1")
    _reject(hf, "scoring_func", lambda v: v == "softmax", "a router scoring function other than softmax")
    _reject(hf, "topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
            "a topk_method other than greedy / group_limited_greedy")
    nope, rope_d, v_d = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    rope = _rope_config(hf, rope_d, interleaved=True)
    scale = (nope + rope_d) ** -0.5
    # transformers' DeepseekV2Attention multiplies the softmax scale by yarn_mscale(factor, mscale_all_dim)².
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
        scale *= m * m
    E = hf.get("n_routed_experts") or 0
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    n_layers = common["num_layers"]
    n_shared = hf.get("n_shared_experts") or 0
    return ModelConfig(
        **common, family="deepseek_v2", head_dim=nope + rope_d, rope=rope, attention="mla",
        qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
        sliding_windows=(None,) * n_layers,
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_d, v_head_dim=v_d, attn_scale=scale,
        dense_intermediate=hf["intermediate_size"],
        moe_layers=tuple(E > 0 and i >= first_dense for i in range(n_layers)),
        num_experts=E, top_k=hf.get("num_experts_per_tok") or 0, moe_intermediate=hf.get("moe_intermediate_size", 0),
        # transformers' DeepseekV2TopkRouter never renormalises (norm_topk_prob is ignored there); we match it.
        norm_topk_prob=False, topk_method=hf.get("topk_method") or "greedy",
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), router_fp32_weight=True,
        shared_intermediate=(hf.get("moe_intermediate_size", 0) * n_shared))

