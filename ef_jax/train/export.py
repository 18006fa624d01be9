"""Writes a trained model as a Hugging Face checkpoint directory that both ef_jax.load and transformers load:
config.json, model.safetensors (bf16 by default, per-expert tensor names), generation_config.json, tokenizer.

Names and layouts come from ef_jax.checkpoint's own map (the inverse of what the loader reads), so export and
load cannot drift apart.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ef_jax.checkpoint import DTYPES, hf_name_map, iter_param_leaves
from ef_jax.config import ModelConfig

_EXPERT_HF = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def hf_tensors(cfg: ModelConfig, params: dict, experts: tuple, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Our params (+ per-layer experts [E, D, F] / [E, F, D]) → {HF name: torch-layout array}."""
    np_dtype = DTYPES[dtype]
    names = hf_name_map(cfg)
    out = {}
    for ours, arr in iter_param_leaves(params):
        hf, transpose = names[ours]
        a = np.asarray(arr, np.float32)
        out[hf] = np.ascontiguousarray(a.T if transpose else a).astype(np_dtype)
    for i, ex in enumerate(experts):
        if ex is None:
            continue
        for k, stack in ex.items():
            stack = np.asarray(stack, np.float32)
            for j in range(stack.shape[0]):  # torch Linear weight = [out, in] = our [in, out] transposed
                out[f"model.layers.{i}.mlp.experts.{j}.{_EXPERT_HF[k]}.weight"] = \
                    np.ascontiguousarray(stack[j].T).astype(np_dtype)
    return out


def export_checkpoint(out_dir: str, cfg: ModelConfig, hf_config: dict, params: dict, experts: tuple, tokenizer,
                      *, dtype: str = "bfloat16", extra_files: dict[str, str] | None = None) -> None:
    """Writes everything into a temporary sibling directory, then swaps it in: a failure leaves nothing
    half-written at out_dir."""
    from safetensors.numpy import save_file
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(hf_tensors(cfg, params, experts, dtype), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        hf_config = dict(hf_config, torch_dtype=dtype, dtype=dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        eos = hf_config["eos_token_id"]
        gen = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": eos, "pad_token_id": eos,
               "do_sample": False, "max_new_tokens": 64}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
