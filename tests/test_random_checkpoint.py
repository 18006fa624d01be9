"""`python -m ef_jax.random_model` writes a Hugging Face checkpoint of a real model's shapes (bf16, sharded, with
its index) that ef_jax loads and decodes; refusals are one line, exit 2."""
import json
import os
import subprocess
import sys

import ef_jax
from ef_jax import random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_deepseek_v2_lite_shapes_with_two_moe_layers_load_and_decode(tmp_path):
    out = str(tmp_path / "ds")
    # real D, F, shared experts, MLA ranks; 6 experts (its top-k) and a small vocabulary keep it ~300 MB
    assert random_checkpoint.main(["--model", "deepseek-v2-lite", "--layers", "2", "--dense-layers", "0",
                                   "--experts", "6", "--vocab", "1024", "--shard-size", "128MiB", "--out", out]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1   # sharded
    m = ef_jax.load(out, dtype="bfloat16")
    cfg = m.config
    assert (cfg.family, cfg.num_moe_layers, cfg.hidden_size, cfg.moe_intermediate, cfg.kv_lora_rank,
            cfg.shared_intermediate) == ("deepseek_v2", 2, 2048, 1408, 512, 2816)
    gate = m.experts.layer(0)["gate"]
    assert gate.shape == (6, 2048, 1408) and str(gate.dtype) == "bfloat16"
    toks = ef_jax.generate(m, [[1, 2, 3]], max_new_tokens=2).tokens[0]
    assert len(toks) == 2 and all(0 <= t < 1024 for t in toks)

def test_help_and_refusals():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "ef_jax.random_model", "--help"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "deepseek-v2-lite" in r.stdout and "--moe" not in r.stderr
    assert random_checkpoint.hf_config("olmoe", 2)["num_hidden_layers"] == 2
    for bad in (dict(name="mixtral", layers=2, dense_layers=1), dict(name="olmoe", layers=2, experts=4),
                dict(name="qwen3-30b-a3b", layers=0)):
        try:
            random_checkpoint.hf_config(**bad)
        except ValueError as e:
            assert str(e)
        else:
            raise AssertionError(bad)
