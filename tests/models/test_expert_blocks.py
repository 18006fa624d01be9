"""expert_blocks: the expert FFN converts the slots it reads a block at a time (issue 24: the int4 layer-mode prefill
dequantized a whole DeepSeek-V2-Lite layer of 64 slots to f32, 2.1 GiB of temporaries, and peaked over the bound).

Two halves: the blocked formulations give the unblocked ones' results on small pools (every block size, a remainder
block, masked and repeated slots), and the layer program compiled for DeepSeek-V2-Lite's real expert shapes (abstract
inputs: nothing is allocated) holds temporaries of about one block, not one layer's converted pool."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ef_jax import random_checkpoint
from ef_jax.config import from_hf_config
from ef_jax.engine.programs.layer import offloaded_expert_pass
from ef_jax.models import expert_blocks, moe
from ef_jax.models.moe import ExpertPool, Routing
from ef_jax.quant.codes import QuantSpec
from ef_jax.quant.pool import QuantExpertPool, quantize_experts

N, K, S, D, F = 5, 3, 7, 32, 16


def _pools():
    rs = np.random.RandomState(0)
    ex = {"gate": rs.randn(S, D, F) * 0.2, "up": rs.randn(S, D, F) * 0.2, "down": rs.randn(S, F, D) * 0.2}
    bf16 = ExpertPool(**{k: jnp.asarray(v, jnp.bfloat16) for k, v in ex.items()})
    int4 = jax.tree.map(jnp.asarray, quantize_experts({k: v.astype(np.float32) for k, v in ex.items()},
                                                      QuantSpec(4, 16, "rtn", False)))
    int8 = jax.tree.map(jnp.asarray, quantize_experts({k: v.astype(np.float32) for k, v in ex.items()},
                                                      QuantSpec(8, 16, "rtn", True)))
    return {"bf16": bf16, "int4": int4, "int8": int8}


def _inputs():
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(N, D), jnp.float32)
    slots = rs.randint(0, S, (N, K)).astype(np.int32)
    slots[0] = [2, 2, 0]           # a slot chosen twice by one token
    weights = rs.rand(N, K).astype(np.float32)
    weights[1, 1] = weights[3] = 0.0  # masked pairs (padding, or an expert left to another pass)
    return x, jnp.asarray(slots), jnp.asarray(weights)


@pytest.mark.parametrize("kind", ["bf16", "int4", "int8"])
@pytest.mark.parametrize("per", [1, 2, 3, 7])
def test_blocked_forms_equal_the_unblocked_ones(kind, per):
    pool = _pools()[kind]
    assert expert_blocks.per_block(pool, jnp.float32) > N * K  # these small pools take the unblocked forms
    x, slots, w = _inputs()
    gather = moe.expert_ffn_gather(x, slots, w, pool)
    np.testing.assert_allclose(expert_blocks.gather_blocked(x, slots, w, pool, per), gather, rtol=1e-5, atol=1e-6)
    grouped = moe.expert_ffn_grouped(x, slots, w, pool)
    np.testing.assert_allclose(expert_blocks.dense_blocked(x, slots, w, pool, per), grouped, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gather, grouped, rtol=1e-5, atol=1e-6)


def test_a_pool_read_in_its_own_dtype_converts_nothing():
    pool = _pools()["bf16"]
    assert expert_blocks.per_block(pool, jnp.bfloat16) is None
    assert expert_blocks.per_block(pool, jnp.float32, limit=3 * D * F * 4 * 2) == 2
    assert expert_blocks.per_block(pool, jnp.float32, limit=1) == 1  # a block holds at least one expert


# ---- the layer program at DeepSeek-V2-Lite's expert shapes -------------------------------------------------------

def _dsv2_abstract(kind: str, L: int, slots: int):
    """An abstract stacked pool [L, S, ...] of DeepSeek-V2-Lite experts (D 2048, F 1408): int4 (group 64, with
    offsets: the load default) or bf16, and the model config."""
    cfg = from_hf_config(random_checkpoint.hf_config("deepseek-v2-lite", 3))
    d, f = cfg.hidden_size, cfg.moe_intermediate
    sd = jax.ShapeDtypeStruct
    if kind == "bf16":
        pool = ExpertPool(gate=sd((L, slots, d, f), jnp.bfloat16), up=sd((L, slots, d, f), jnp.bfloat16),
                          down=sd((L, slots, f, d), jnp.bfloat16))
    else:
        codes = lambda i, o: sd((L, slots, i // 2, o), jnp.uint8)
        group = lambda i, o: sd((L, slots, i // 64, o), jnp.float16)
        pool = QuantExpertPool(gate=codes(d, f), up=codes(d, f), down=codes(f, d), gate_scale=group(d, f),
                               up_scale=group(d, f), down_scale=group(f, d), gate_offset=group(d, f),
                               up_offset=group(d, f), down_offset=group(f, d), bits=4)
    return cfg, pool


@pytest.mark.parametrize("kind", ["int4", "bf16"])
@pytest.mark.parametrize("tokens", [16, 1], ids=["prefill", "decode"])
def test_layer_program_temporaries_stay_about_one_block(kind, tokens):
    """The layer mode's expert program over 2 MoE layers × 64 slots under float32 compute (the CPU default), for
    the bench's 3-token prompt (bucketed to 16 tokens: 96 pairs, the grouped path) and a decode step. Before the
    blocks the prefill program held the whole layer converted to f32 (2.1 GiB for int4 and for bf16 experts)."""
    L, slots = 2, 64
    cfg, pool = _dsv2_abstract(kind, L, slots)
    E, k, d = cfg.num_experts, cfg.top_k, cfg.hidden_size
    sd = jax.ShapeDtypeStruct
    f32, i32 = jnp.float32, jnp.int32
    routing = Routing(logits=sd((tokens, E), f32), experts=sd((tokens, k), i32), weights=sd((tokens, k), f32))
    compiled = offloaded_expert_pass.lower(
        cfg, False, {}, sd((1, tokens, d), f32), sd((tokens, d), f32), routing, sd((tokens, k), f32), pool,
        sd((L, E), i32), sd((), i32), (), sd((0, 4), i32), sd((), jnp.bool_), kernel="xla").compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    layer_f32 = slots * 3 * d * cfg.moe_intermediate * 4
    assert temp < layer_f32 // 4, f"{temp / 2**20:.0f} MiB of temporaries, one layer in f32 is {layer_f32 / 2**20:.0f}"
    assert temp < 2 * expert_blocks.CONVERT_BLOCK_BYTES, f"{temp / 2**20:.0f} MiB of temporaries"
