"""Issue 24: one host copy of the experts, streamed from the checkpoint in their stored dtype; one pinned store per
model across step modes; the mapped mode; the quantized-expert cache."""
import dataclasses
import gc

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.engine.transfer import residency
from ef_jax.host_experts import ArrayRows, CheckpointRows
from ef_jax.random_checkpoint import write as write_checkpoint

E, D, F = 8, 64, 256
HF = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=D, intermediate_size=128, moe_intermediate_size=F,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=E, num_experts_per_tok=2,
          norm_topk_prob=True, decoder_sparse_step=1, rms_norm_eps=1e-6, rope_theta=1e6, num_hidden_layers=2,
          max_position_embeddings=256, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
          torch_dtype="bfloat16")
PROMPTS = [[3, 5, 7, 11], [13, 17, 19, 23]]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bf16ckpt"))
    write_checkpoint(d, HF, shard_bytes=200_000)  # several shards
    return d


def _expert_sized_arrays() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, np.ndarray) and o.size >= D * F]


def test_load_keeps_no_host_copy_of_the_experts(bf16_checkpoint):
    before = len(_expert_sized_arrays())
    model = ef_jax.load(bf16_checkpoint, dtype="float32")
    assert isinstance(model.experts, CheckpointRows)
    assert model.experts.layout.dtype == np.dtype("bfloat16")  # stored dtype kept under float32 compute
    assert len(_expert_sized_arrays()) == before
    ef_jax.generate(model, PROMPTS, max_new_tokens=2, offload=OffloadConfig(slots_per_layer=2))
    assert len(_expert_sized_arrays()) == before  # the pinned store holds jax arrays, and nothing else stays


def test_bf16_host_experts_compute_exactly_as_float32_experts(bf16_checkpoint):
    model = ef_jax.load(bf16_checkpoint, dtype="float32")
    rows = model.experts
    upcast = ArrayRows([{k: v.astype(np.float32) for k, v in rows.layer(j).items()} for j in range(rows.num_layers)])
    f32 = dataclasses.replace(model, experts=upcast)
    tokens = np.array([[3, 5, 7, 11, 2, 9]], np.int32)
    np.testing.assert_array_equal(ef_jax.logits(model, tokens), ef_jax.logits(f32, tokens))
    off = OffloadConfig(slots_per_layer=2)
    assert ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=off).tokens == \
        ef_jax.generate(f32, PROMPTS, max_new_tokens=4, offload=off).tokens


def test_layer_mode_and_device_step_share_one_pinned_store(bf16_checkpoint):
    model = ef_jax.load(bf16_checkpoint, dtype="float32")
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    layer = ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=OffloadConfig(slots_per_layer=2, check=True))
    store = residency.peek(model, "store:pinned")
    arrays = store.arrays
    device = ef_jax.generate(model, PROMPTS, max_new_tokens=4,
                             offload=OffloadConfig(slots_per_layer=2, step="device", check=True))
    assert layer.tokens == device.tokens == ref
    assert residency.peek(model, "store:pinned") is store and store.arrays is arrays
    assert layer.stats["host_bytes_pinned"] == device.stats["host_bytes_pinned"] == model.experts.nbytes
    assert layer.stats["host_bytes_mapped"] == 0
    residency.drop(model, "store")
    assert residency.peek(model, "store:pinned") is None


def test_mapped_runs_where_pinned_cannot_fit(bf16_checkpoint, monkeypatch):
    model = ef_jax.load(bf16_checkpoint, dtype="float32")
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    monkeypatch.setenv("EF_JAX_HOST_MEMORY_AVAILABLE", str(model.experts.nbytes // 2))  # "larger than free RAM"
    with pytest.raises(ValueError, match="host_memory='mapped'") as err:
        ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=OffloadConfig(slots_per_layer=2))
    assert "\n" not in str(err.value)
    for transfers in ("program", "inline"):
        got = ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=OffloadConfig(
            slots_per_layer=2, host_memory="mapped", transfers=transfers, check=True))
        assert got.tokens == ref
        assert got.stats["host_bytes_mapped"] == model.experts.nbytes and got.stats["host_bytes_pinned"] == 0
    with pytest.raises(ValueError, match="step='layer'"):
        ef_jax.generate(model, PROMPTS, max_new_tokens=1,
                        offload=OffloadConfig(slots_per_layer=2, host_memory="mapped", step="device"))


def test_quantized_experts_are_cached(bf16_checkpoint, tmp_path, monkeypatch):
    import os

    import ef_jax.quant.cache as qcache
    monkeypatch.setenv("EF_JAX_CACHE_DIR", str(tmp_path))
    first = ef_jax.load(bf16_checkpoint, dtype="float32", expert_dtype="int4")
    assert first.expert_quant.method == "rtn"  # round-to-nearest at load (HQQ is for ef-jax convert)
    entries = os.listdir(tmp_path / "experts")
    assert len(entries) == 1
    monkeypatch.setattr(qcache, "quantize_experts", lambda *a: pytest.fail("quantized again"))
    second = ef_jax.load(bf16_checkpoint, dtype="float32", expert_dtype="int4")
    off = OffloadConfig(slots_per_layer=2)
    assert ef_jax.generate(first, PROMPTS, max_new_tokens=4, offload=off).tokens == \
        ef_jax.generate(second, PROMPTS, max_new_tokens=4, offload=off).tokens == \
        ef_jax.generate(second, PROMPTS, max_new_tokens=4).tokens
    monkeypatch.undo()
    monkeypatch.setenv("EF_JAX_CACHE_DIR", str(tmp_path))
    ef_jax.load(bf16_checkpoint, dtype="float32", expert_dtype="int4", group_size=32, quant_cache=False)
    assert os.listdir(tmp_path / "experts") == entries  # no entry, and the temporary file is gone
    assert os.listdir(tmp_path / "tmp") == []


def test_quantizing_in_expert_chunks_gives_the_same_rows(bf16_checkpoint, tmp_path, monkeypatch):
    import ef_jax.quant.cache as qcache
    whole = ef_jax.load(bf16_checkpoint, dtype="float32", expert_dtype="int8", quant_cache=False).experts
    monkeypatch.setattr(qcache, "CHUNK_EXPERTS", 3)  # 8 experts: chunks of 3, 3, 2
    chunked = ef_jax.load(bf16_checkpoint, dtype="float32", expert_dtype="int8", quant_cache=False).experts
    assert chunked.layout == whole.layout
    for j in range(whole.num_layers):
        np.testing.assert_array_equal(chunked.rows(j), whole.rows(j))
