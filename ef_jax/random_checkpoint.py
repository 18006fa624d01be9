"""A Hugging Face checkpoint of a named real MoE model's shapes with random weights, written to disk: try the
engine, `ef-jax bench` or a policy at real expert sizes without downloading one.

python -m ef_jax.random_model --model deepseek-v2-lite --layers 4 --out DIR
  → config.json (the real config, fewer layers) + generation_config.json
  → model-0000i-of-0000n.safetensors (bf16, sharded at --shard-size) + model.safetensors.index.json

Tensors are drawn and written one at a time, so writing takes memory for one tensor, not the model. Names and
shapes come from the loader's own tables (ef_jax.checkpoint), so whatever is written is what `ef_jax.load` reads.
Only shapes are real: the weights are Normal(0, 0.02) (norm scales 1), and no tokenizer is written (prompt with
--prompt-ids). --experts / --vocab shrink a test model; leave them out for real sizes.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ef_jax.checkpoint import DTYPES, _expert_names, expected_shapes, hf_name_map
from ef_jax.config import from_hf_config

_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False)
# The public config.json of each model (sizes as published; rope scaling left out: it changes no shape).
REAL = {
    "deepseek-v2-lite": dict(_COMMON, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                             vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                             n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=512,
                             q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                             topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1,
                             norm_topk_prob=False, scoring_func="softmax", moe_layer_freq=1,
                             max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
                             bos_token_id=100000, eos_token_id=100001),
    "mixtral": dict(_COMMON, architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000,
                    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None, bos_token_id=1,
                    eos_token_id=2),
    "qwen3-30b-a3b": dict(_COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6, bos_token_id=151643,
                          eos_token_id=151645),
    "olmoe": dict(_COMMON, architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=50304,
                  hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                  rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5, clip_qkv=None,
                  bos_token_id=None, eos_token_id=50279),
}
_EXPERTS_KEY = {"deepseek_v2": "n_routed_experts", "mixtral": "num_local_experts"}  # else num_experts


def hf_config(name: str, layers: int, dense_layers: int | None = None, experts: int | None = None,
              vocab: int | None = None) -> dict:
    """The real config.json of `name` with `layers` decoder layers, the first `dense_layers` of them dense (default:
    as the real model, at most layers - 1), and optionally fewer experts / a smaller vocabulary."""
    if name not in REAL:
        raise ValueError(f"model {name!r} is not one of {', '.join(REAL)}")
    if layers < 1:
        raise ValueError(f"layers={layers} must be at least 1")
    hf = dict(REAL[name], num_hidden_layers=layers)
    family = hf["model_type"]
    real_dense = hf.get("first_k_dense_replace", 0)
    dense = min(real_dense, layers - 1) if dense_layers is None else dense_layers
    if not 0 <= dense < layers:
        raise ValueError(f"dense_layers={dense} must lie in [0, layers={layers}): at least one MoE layer")
    if family == "deepseek_v2":
        hf["first_k_dense_replace"] = dense
    elif family == "qwen3_moe":
        hf["mlp_only_layers"] = list(range(dense))
    elif dense:
        raise ValueError(f"{name} has no dense layers: leave out --dense-layers (or give 0)")
    if experts is not None:
        key = _EXPERTS_KEY.get(family, "num_experts")
        if not hf["num_experts_per_tok"] <= experts:
            raise ValueError(f"experts={experts} is fewer than top-k={hf['num_experts_per_tok']}")
        hf[key] = experts
    if vocab is not None:
        hf["vocab_size"] = vocab
        hf["bos_token_id"] = hf["eos_token_id"] = None  # the real ids may lie outside a smaller vocabulary
    return hf


def tensor_plan(hf: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(HF tensor name, HF shape, is a norm scale) of every tensor, in file order."""
    cfg = from_hf_config(hf)
    names = hf_name_map(cfg)
    plan = []
    for ours, shape in expected_shapes(cfg).items():
        hf_name, transpose = names[ours]
        plan.append((hf_name, tuple(reversed(shape)) if transpose else shape, ours.endswith("norm")))
    D, F = cfg.hidden_size, cfg.moe_intermediate
    for i in cfg.moe_layer_ids:
        moe_pre, proj = _expert_names(cfg, f"model.layers.{i}")
        for j in range(cfg.num_experts):
            for ours, name in proj.items():
                plan.append((f"{moe_pre}.experts.{j}.{name}.weight", (D, F) if ours == "down" else (F, D), False))
    return plan


def _shards(plan, itemsize: int, shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for t in plan:
        n = int(np.prod(t[1])) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_safetensors(path: str, tensors, draw) -> int:
    """The safetensors format by hand (8-byte header length, JSON header, raw bytes), streamed tensor by tensor."""
    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, norm in tensors:
            f.write(draw(shape, norm).tobytes())
    return offset


def write(out: str, hf: dict, *, seed: int = 0, shard_bytes: int = 2 << 30) -> list[str]:
    """Writes the checkpoint of config `hf` to `out`; returns the shard file names."""
    rng = np.random.default_rng(seed)
    bf16 = DTYPES["bfloat16"]

    def draw(shape, norm):
        if norm:
            return np.ones(shape, bf16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    os.makedirs(out, exist_ok=True)
    shards = _shards(tensor_plan(hf), 2, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, tensors in zip(files, shards):
        total += _write_safetensors(os.path.join(out, fname), tensors, draw)
        weight_map.update({name: fname for name, _, _ in tensors})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if hf.get(k) is not None}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return files


def _size(text: str) -> int:
    from ef_jax.cache.config import parse_bytes
    return parse_bytes(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ef_jax.random_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(REAL), help="whose shapes")
    ap.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    ap.add_argument("--dense-layers", type=int, default=None,
                    help="leading dense layers (default: as the real model, e.g. 1 for DeepSeek-V2-Lite)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (default: the real count)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real one)")
    ap.add_argument("--shard-size", default="2GiB", help="bytes per safetensors shard (default 2GiB)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        hf = hf_config(args.model, args.layers, args.dense_layers, args.experts, args.vocab)
        if os.path.exists(os.path.join(args.out, "config.json")):
            raise ValueError(f"--out {args.out} already holds a checkpoint: give a new directory")
        files = write(args.out, hf, seed=args.seed, shard_bytes=_size(args.shard_size))
    except ValueError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    cfg = from_hf_config(hf)
    print(f"wrote {args.out}: {args.model} shapes, {cfg.num_layers} layers ({cfg.num_moe_layers} MoE, "
          f"{cfg.num_experts} experts of D={cfg.hidden_size} F={cfg.moe_intermediate}), bf16 in {len(files)} "
          f"shard{'s' if len(files) > 1 else ''}")
    return 0
