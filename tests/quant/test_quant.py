"""Quantized experts: numpy reference, device dequantization, load, offloaded vs resident tokens, bytes, refusals."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.quant import (QuantExpertPool, QuantSpec, dequantize, dequantize_reference, pack_int4, quantize,
                          quantize_experts, unpack_int4)
from ef_jax.quant.codes import quantized_nbytes, spec_for
from ef_jax.engine.transfer.store import store_for

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

PROMPTS = [[5, 17, 3, 9], [11, 2]]
SPECS = [QuantSpec(8, 16, "rtn", True), QuantSpec(8, 16, "rtn", False), QuantSpec(4, 16, "rtn", True),
         QuantSpec(4, 16, "rtn", False), QuantSpec(4, 16, "hqq", False), QuantSpec(4, 8, "hqq", False)]


def _numpy_dequant(codes, scale, offset, bits):
    """An independent loop-level reference: unpack each byte by hand, apply its group's scale/offset."""
    *lead, packed_rows, cols = codes.shape
    rows = packed_rows * 2 if bits == 4 else packed_rows
    g = rows // scale.shape[-2]
    out = np.zeros((*lead, rows, cols), np.float32)
    for idx in np.ndindex(*lead):
        for r in range(rows):
            if bits == 4:
                byte = codes[idx][r % packed_rows]
                u = (byte & 0xF) if r < packed_rows else (byte >> 4)
            else:
                u = codes[idx][r]
            s = scale[idx][r // g].astype(np.float32)
            if offset is None:
                out[idx][r] = (u.astype(np.float32) - (1 << (bits - 1))) * s
            else:
                out[idx][r] = u.astype(np.float32) * s + offset[idx][r // g].astype(np.float32)
    return out


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantize_equals_numpy_reference(spec):
    w = np.random.default_rng(1).standard_normal((3, 32, 12)).astype(np.float32) * 0.1
    q = quantize(w, spec)
    ref = _numpy_dequant(q.codes, q.scale, q.offset, q.bits)
    np.testing.assert_array_equal(dequantize_reference(q), ref)
    np.testing.assert_array_equal(np.asarray(dequantize(q.codes, q.scale, q.offset, q.bits)), ref)
    # and it is a quantization of w: within one step of every weight (half a step + float16 parameter rounding)
    step = q.scale.astype(np.float32).repeat(32 // q.scale.shape[1], axis=1)
    assert np.all(np.abs(ref - w) <= step * (0.5 if spec.method == "rtn" else 1.0) + 1e-6)
    assert q.codes.dtype == np.uint8 and q.scale.dtype == np.float16
    assert q.codes.shape == (3, 32 * spec.bits // 8, 12)


def test_pack_int4_round_trip_and_layout():
    u = np.random.default_rng(2).integers(0, 16, (2, 8, 5)).astype(np.uint8)
    p = pack_int4(u)
    assert p.shape == (2, 4, 5)
    np.testing.assert_array_equal(p[:, 1] & 0xF, u[:, 1])        # row r in the low nibble
    np.testing.assert_array_equal(p[:, 1] >> 4, u[:, 5])         # row r + I/2 in the high nibble
    np.testing.assert_array_equal(unpack_int4(p), u)


def test_hqq_not_worse_than_rtn_and_int4_error_bounded():
    w = np.random.default_rng(3).standard_normal((4, 64, 32)).astype(np.float32) * 0.05
    w[0, 3, 4] = 0.6  # an outlier
    err = {m: np.abs(dequantize_reference(quantize(w, QuantSpec(4, 32, m, False))) - w).mean() for m in ("rtn", "hqq")}
    assert err["hqq"] <= err["rtn"]
    assert err["rtn"] < 0.1 * np.abs(w).mean()


def test_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="divides 24"):
        QuantSpec(4, 16).group_for(24)
    with pytest.raises(ValueError, match="symmetric=False"):
        QuantSpec(4, 64, "hqq", True)
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        spec_for("int3", None, "float32")
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        spec_for("bf16", None, "float32")
    with pytest.raises(ValueError, match="only applies"):
        spec_for(None, 64, "float32")
    assert spec_for("bf16", None, "bfloat16") is None


@pytest.mark.parametrize("bits,limit", [(8, 0.55), (4, 0.30)])
def test_bytes_per_expert_against_bf16(tiny_checkpoint, bits, limit):
    """Default group size on a real expert shape (DeepSeek-V2-Lite: D 2048, F 1408), and what the store copies."""
    spec = spec_for(f"int{bits}", None, "bfloat16")
    D, F = 2048, 1408
    q_bytes = 2 * quantized_nbytes(D, F, spec) + quantized_nbytes(F, D, spec)
    assert q_bytes <= limit * 3 * D * F * 2
    model = ef_jax.load(tiny_checkpoint("olmoe"), expert_dtype=f"int{bits}")  # D 32, F 16: one group per column
    store = store_for(model)
    assert store.bytes_per_expert == model.param_bytes()["per_expert"]
    assert store.bytes_per_expert < 3 * 32 * 16 * 2 * (0.75 if bits == 8 else 0.5)


# int4 on one variant of every family, chosen to cover what touches the quantized experts (F = 24 and 16, top-1,
# -2 and -3, dense layers between MoE layers, MLA); the routing/attention features of the other variants do not
# reach the expert FFN, and test_parity covers them. int8 differs only in the code width (no packing): two variants,
# one with a shared expert.
QUANT_CASES = [(n, "int4") for n in ("mixtral-top2", "qwen2moe-norm-sparse-step", "qwen3moe-top1-dense0",
                                     "olmoe-norm-clip", "deepseek-qlora-none")] + [
    ("qwen2moe-shared", "int8"), ("deepseek-qlora-grouped-yarn", "int8")]


@pytest.mark.parametrize("name,expert_dtype", QUANT_CASES)
def test_quantized_offloaded_tokens_equal_quantized_resident(tiny_checkpoint, name, expert_dtype):
    model = ef_jax.load(tiny_checkpoint(name), expert_dtype=expert_dtype, group_size=8)  # 8 divides F = 16 and 24
    assert isinstance(model.experts.layer(0), QuantExpertPool)
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    # top-k slots: the fewest that decode at all, so nearly every step evicts and rewrites slots
    got = ef_jax.generate(model, PROMPTS, max_new_tokens=4,
                          offload=OffloadConfig(slots_per_layer=model.config.top_k, policy="lru", check=True))
    assert got.tokens == ref, (name, expert_dtype)
    assert got.stats["misses"] > 0 and got.stats["h2d_bytes"] % store_for(model).bytes_per_expert == 0


def test_quantized_experts_change_little_and_int8_beats_int4(tiny_checkpoint):
    path = tiny_checkpoint("qwen3moe-norm")
    tokens = np.asarray([[5, 17, 3, 9, 40, 2, 7, 8]])
    ref = ef_jax.logits(ef_jax.load(path), tokens)
    err = {}
    for dt in ("int8", "int4"):
        got = ef_jax.logits(ef_jax.load(path, expert_dtype=dt, group_size=16), tokens)
        err[dt] = np.abs(got - ref).max()
    assert 0 < err["int8"] < err["int4"] < 0.5 * np.abs(ref).max()


def test_quantized_bfloat16_offloaded_equals_resident(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("deepseek-qlora-grouped-yarn"), dtype="bfloat16", expert_dtype="int4",
                        group_size=16)
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    got = ef_jax.generate(model, PROMPTS, max_new_tokens=4,
                          offload=OffloadConfig(slots_per_layer=model.config.top_k, check=True)).tokens
    assert got == ref


def test_budget_counts_quantized_bytes(tiny_checkpoint):
    """The same expert_memory holds more int4 experts than float ones (and more slots → a higher hit rate)."""
    path = tiny_checkpoint("olmoe")
    f32, q4 = ef_jax.load(path, dtype="bfloat16"), ef_jax.load(path, dtype="bfloat16", expert_dtype="int4")
    cfg = f32.config
    budget = store_for(f32).bytes_per_expert * cfg.num_moe_layers * cfg.top_k
    res = {m: ef_jax.generate(model, PROMPTS, max_new_tokens=6, offload=OffloadConfig(expert_memory=budget)).stats
           for m, model in (("bf16", f32), ("int4", q4))}
    assert res["bf16"]["slots_per_layer"] == cfg.top_k
    assert res["int4"]["slots_per_layer"] > 2 * cfg.top_k
    assert res["int4"]["hit_rate"] > res["bf16"]["hit_rate"]


def test_prequantized_checkpoint_is_refused_by_name(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("olmoe")
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), tmp_path / f)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    os.unlink(tmp_path / "config.json")
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(NotImplementedError, match="'fp8'"):
        ef_jax.load(str(tmp_path))


def test_quant_pool_matrix_equals_dequantized_reference():
    rng = np.random.default_rng(4)
    ex = {"gate": rng.standard_normal((4, 32, 16)).astype(np.float32), "up": rng.standard_normal((4, 32, 16)).astype(
        np.float32), "down": rng.standard_normal((4, 16, 32)).astype(np.float32)}
    spec = QuantSpec(4, 16, "hqq", False)
    pool = jax.tree.map(jnp.asarray, quantize_experts(ex, spec))
    ids = jnp.asarray([[2, 0], [3, 3]], jnp.int32)
    got = np.asarray(QuantExpertPool.matrix(pool, "down", ids))
    full = dequantize_reference(quantize(ex["down"], spec))
    np.testing.assert_array_equal(got, full[np.asarray(ids)])


def test_with_quantized_experts_on_a_random_model():
    from ef_jax.quant import with_quantized_experts
    from ef_jax.random_model import presets, random_model
    model = random_model(presets()["tiny"])
    q = with_quantized_experts(model, "int8", group_size=16)
    assert q.params is model.params and q.expert_quant.bits == 8
    assert q.param_bytes()["per_expert"] < 0.3 * model.param_bytes()["per_expert"]  # f32 → int8 + scales
    ref = ef_jax.generate(q, [[3, 4, 5]], max_new_tokens=3).tokens
    got = ef_jax.generate(q, [[3, 4, 5]], max_new_tokens=3,
                          offload=OffloadConfig(slots_per_layer=q.config.top_k, check=True)).tokens
    assert got == ref
    with pytest.raises(ValueError, match="already quantized"):
        with_quantized_experts(q, "int4")


@pytest.mark.parametrize("extra", [dict(transfers="thread"), dict(timing="h100", policy="pregate")], ids=str)
def test_quantized_copy_paths_equal_resident(tiny_checkpoint, extra):
    """The copy-thread queue and the virtual-clock queue move the same u8 buffers into the quantized slots."""
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"), expert_dtype="int4", group_size=8)
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    offload = OffloadConfig(slots_per_layer=model.config.top_k, check=True, **extra)
    assert ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=offload).tokens == ref
