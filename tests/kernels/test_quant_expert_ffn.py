"""kernels_pallas.quant_expert_ffn (dequantization fused into the Pallas kernel) against its reference, in
interpret mode on CPU (natively on a GPU: the `gpu` test), and the reference against ef_jax.quant's numpy one.

Axes: T tokens, K experts per token, S slots, D model width, F expert FFN width, G group rows.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.models import moe
from ef_jax.quant import QuantSpec, dequantize_reference, quantize, quantize_experts
from kernels_pallas import BlockSizes, expert_ffn_reference, quant_expert_ffn, quant_expert_ffn_reference
from kernels_pallas import quant_pool_expert_ffn

SMALL = BlockSizes(decode_block_f=16, decode_block_d=16, block_m=16, block_f=16, block_d=16)


def _case(seed, T, K, S, D, F, spec, dtype=jnp.float32):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(T, D), dtype)
    slots = rs.randint(0, S, (T, K))
    slots[0, -1] = slots[0, 0]  # a token naming a slot twice
    w = jnp.asarray(rs.rand(T, K), jnp.float32)
    ex = {"gate": rs.randn(S, D, F) * 0.1, "up": rs.randn(S, D, F) * 0.1, "down": rs.randn(S, F, D) * 0.1}
    pool = jax.tree.map(jnp.asarray, quantize_experts({k: v.astype(np.float32) for k, v in ex.items()}, spec))
    return x, jnp.asarray(slots, jnp.int32), w, pool


def _args(pool):
    return ((pool.gate, pool.up, pool.down), (pool.gate_scale, pool.up_scale, pool.down_scale),
            None if pool.symmetric else (pool.gate_offset, pool.up_offset, pool.down_offset))


def _close(out, ref, tol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.abs(out - ref).max() <= tol * (np.abs(ref).max() + 1e-6)


CASES = [QuantSpec(8, 16, "rtn", True), QuantSpec(8, 16, "rtn", False), QuantSpec(4, 16, "rtn", True),
         QuantSpec(4, 16, "hqq", False), QuantSpec(4, 8, "hqq", False)]


@pytest.mark.parametrize("spec", CASES, ids=str)
@pytest.mark.parametrize("regime,T", [("decode", 3), ("prefill", 20)])
def test_kernel_equals_reference_interpret(spec, regime, T):
    x, slots, w, pool = _case(0, T, 2, 5, 64, 32, spec)
    ref = quant_expert_ffn_reference(x, slots, w, *_args(pool), bits=pool.bits)
    out = quant_expert_ffn(x, slots, w, *_args(pool), bits=pool.bits, block_sizes=SMALL, interpret=True,
                           regime=regime)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _close(out, ref, 1e-5)


def test_kernel_bfloat16_equals_reference_interpret():
    x, slots, w, pool = _case(1, 4, 3, 6, 64, 32, QuantSpec(4, 16, "hqq", False), jnp.bfloat16)
    ref = quant_expert_ffn_reference(x, slots, w, *_args(pool), bits=4)
    _close(quant_pool_expert_ffn(x, slots, w, pool, block_sizes=SMALL, interpret=True), ref, 2e-2)


def test_reference_equals_numpy_dequantized_float_ffn():
    spec = QuantSpec(4, 16, "rtn", False)
    rs = np.random.RandomState(2)
    ex = {"gate": rs.randn(4, 32, 16).astype(np.float32), "up": rs.randn(4, 32, 16).astype(np.float32),
          "down": rs.randn(4, 16, 32).astype(np.float32)}
    pool = jax.tree.map(jnp.asarray, quantize_experts(ex, spec))
    floats = [jnp.asarray(dequantize_reference(quantize(ex[m], spec))) for m in ("gate", "up", "down")]
    x, slots, w = jnp.asarray(rs.randn(3, 32), jnp.float32), jnp.asarray([[0, 3], [2, 2], [1, 0]], jnp.int32), \
        jnp.asarray(rs.rand(3, 2), jnp.float32)
    np.testing.assert_allclose(np.asarray(quant_expert_ffn_reference(x, slots, w, *_args(pool), bits=4)),
                               np.asarray(expert_ffn_reference(x, slots, w, *floats)), rtol=1e-6, atol=1e-6)
    # and the XLA path of the model (moe.expert_ffn_gather / _grouped over the QuantExpertPool) agrees too
    for fn in (moe.expert_ffn_gather, moe.expert_ffn_grouped):
        np.testing.assert_allclose(np.asarray(fn(x, slots, w, pool)),
                                   np.asarray(expert_ffn_reference(x, slots, w, *floats)), rtol=1e-5, atol=1e-5)


def test_invalid_inputs_name_the_fix():
    x, slots, w, pool = _case(0, 2, 2, 3, 32, 16, QuantSpec(4, 8, "hqq", False))
    with pytest.raises(ValueError, match="power of two ≥ 16"):
        quant_pool_expert_ffn(x, slots, w, pool)  # native: group 8 is too small a Triton tile
    with pytest.raises(ValueError, match="u8"):
        quant_expert_ffn(x, slots, w, (pool.gate, pool.up, pool.down), (pool.gate_scale,) * 3, bits=8, interpret=True)
    _, _, _, odd = _case(0, 2, 2, 3, 32, 24, QuantSpec(4, 8, "hqq", False))
    with pytest.raises(ValueError, match="F % 2Gf"):
        quant_pool_expert_ffn(jnp.zeros((2, 32)), slots, w, odd, interpret=True)


def test_quantized_pallas_kernel_inside_the_engine(tiny_checkpoint):
    """The fused quantized kernel (interpret mode) in the layer mode and in the resident model's fused groups gives
    the XLA path's tokens: the kernel is the model's (load(expert_kernel=...)), whatever the source."""
    path = tiny_checkpoint("qwen3moe-norm")
    model = ef_jax.load(path, expert_dtype="int4", group_size=8)
    kernel = dataclasses.replace(model, expert_kernel="pallas-interpret")  # the same weights
    prompts = [[5, 17, 3, 9], [11, 2]]
    offload = OffloadConfig(slots_per_layer=model.config.top_k)
    ref = ef_jax.generate(model, prompts, max_new_tokens=3, offload=offload).tokens
    got = ef_jax.generate(kernel, prompts, max_new_tokens=3, offload=offload).tokens
    resident = ef_jax.generate(kernel, prompts, max_new_tokens=3).tokens
    assert got == ref and resident == ref


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [QuantSpec(8, 64, "rtn", True), QuantSpec(4, 64, "hqq", False)], ids=str)
@pytest.mark.parametrize("T", [1, 64])
def test_kernel_native_gpu(spec, T):
    x, slots, w, pool = _case(3, T, 4, 16, 512, 256, spec, jnp.bfloat16)
    ref = quant_expert_ffn_reference(x, slots, w, *_args(pool), bits=pool.bits)
    _close(quant_pool_expert_ffn(x, slots, w, pool), ref, 2e-2)
