"""Bad checkpoints and bad arguments fail with one clear exception naming what to fix."""
import json
import os
import shutil

import numpy as np
import pytest

import ef_jax
from ef_jax import CheckpointError
from tests.hf_models import save_tiny

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen3"))
    save_tiny("qwen3moe-norm", d)
    return d


def _copy(src, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def test_unknown_model_type_lists_supported(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_config(d, model_type="llama")
    with pytest.raises(ValueError, match="model_type='llama'.*MixtralForCausalLM.*DeepseekV2ForCausalLM"):
        ef_jax.load(d)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ef_jax.load(str(tmp_path))


def test_missing_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ef_jax.load(d)


def test_corrupt_shard_names_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        ef_jax.load(d)


def test_missing_tensor_named(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    d = _copy(tiny_dir, tmp_path)
    p = os.path.join(d, "model.safetensors")
    tensors = load_file(p)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, p)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight is missing"):
        ef_jax.load(d)


def test_shape_mismatch_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_config(d, moe_intermediate_size=8)
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight .* shape \(16, 32\), expected \(8, 32\)"):
        ef_jax.load(d)


def test_sharded_checkpoint_and_missing_shard(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    d = _copy(tiny_dir, tmp_path)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(d, fname))
        weight_map.update({k: fname for k in keys})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    ref = ef_jax.logits(ef_jax.load(tiny_dir), [[1, 2, 3]])
    np.testing.assert_array_equal(ef_jax.logits(ef_jax.load(d), [[1, 2, 3]]), ref)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="shard .*model-00002-of-00002.safetensors.* is missing"):
        ef_jax.load(d)


def test_unimplemented_features_raise(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="longrope"):
        ef_jax.load(d)
    _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="gelu")
    with pytest.raises(NotImplementedError, match="hidden_act"):
        ef_jax.load(d)


def test_bfloat16_load_close_to_float32(tiny_dir):
    ids = [[4, 8, 15, 16, 23, 42]]
    f32 = ef_jax.logits(ef_jax.load(tiny_dir, dtype="float32"), ids)
    bf16 = ef_jax.logits(ef_jax.load(tiny_dir, dtype="bfloat16"), ids)
    assert bf16.dtype == np.float32
    # bf16 has an 8-bit mantissa (rel. error ~4e-3 per op); over 2-3 layers logits of O(3) stay within ~0.25.
    assert np.abs(bf16 - f32).max() < 0.25
    with pytest.raises(ValueError, match="dtype='float16'"):
        ef_jax.load(tiny_dir, dtype="float16")


def test_bad_generate_arguments(tiny_dir):
    model = ef_jax.load(tiny_dir)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ef_jax.generate(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        ef_jax.generate(model, [[1, 2]], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        ef_jax.generate(model, [[1, 2]], top_p=0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ef_jax.generate(model, [[1, 999]])
    with pytest.raises(ValueError, match="no tokenizer"):
        ef_jax.generate(model, "hello")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ef_jax.generate(model, [[1], []])
    with pytest.raises(ValueError, match=r"token_ids must be a non-empty integer array \[B, T\]"):
        ef_jax.logits(model, [1, 2, 3])


def test_sampling_is_seeded_and_respects_stop_tokens(tiny_dir):
    model = ef_jax.load(tiny_dir)
    a = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    c = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=12, temperature=1.0, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=12).tokens[0]
    stop = greedy[4]
    cut = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=12, stop_token_ids=[stop]).tokens[0]
    assert cut == greedy[: greedy.index(stop) + 1]


def test_quantized_checkpoint_refused_before_tensors_are_read(tiny_dir, tmp_path, monkeypatch):
    import ef_jax.checkpoint as ckpt
    d = _copy(tiny_dir, tmp_path)
    _edit_config(d, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})

    def no_reading(*a, **k):
        raise AssertionError("tensors were opened before the quantization refusal")
    monkeypatch.setattr(ckpt, "SafetensorsReader", no_reading)
    with pytest.raises(NotImplementedError, match="quant_method='fp8'.*not implemented.*unquantized"):
        ef_jax.load(d)


def test_non_utf8_config_names_the_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    p = os.path.join(d, "config.json")
    open(p, "wb").write(open(p, "rb").read().replace(b'"qwen3_moe"', '"qwen3_moe\xe9"'.encode("latin-1")))
    with pytest.raises(ValueError, match=r"config\.json is not valid UTF-8 JSON"):
        ef_jax.load(d)


def test_rope_error_lists_types_not_a_tuple(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError) as e:
        ef_jax.load(d)
    assert "(supported: default, linear, yarn)" in str(e.value)
