"""put_experts (one scatter per leaf of a quantized pool, a chain of in-place writes for a float one) writes what
put_expert, row after row, writes: float and quantized pools, rows given as one array or as a list of rows, a row
overwritten later at the same (layer, slot) included; and the layer program that calls it holds no f32 copy of a
bf16 pool (issue 24: XLA's CPU backend computed a bf16 scatter in f32 over the whole stacked pool)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ef_jax.engine.transfer.store import put_expert, put_experts
from ef_jax.models.moe import ExpertPool
from ef_jax.quant.codes import QuantSpec
from ef_jax.quant.pool import expert_bytes, quantize_experts

L, S, D, F = 3, 4, 16, 8
# (layer, slot) per row: distinct slots over two layers, then the same slot twice (the later row must win)
WRITES = [(0, 1), (2, 3), (1, 0), (0, 1), (2, 2)]


def _sequential(pool, flats, where):
    for flat, (layer, slot) in zip(flats, where):
        pool = put_expert(pool, flat, jnp.int32(layer), jnp.int32(slot))
    return pool


def _scatter(pool, flats, where, as_list=False):
    idx = np.asarray(where, np.int32)
    flats = [jnp.asarray(f[None]) for f in flats] if as_list else jnp.asarray(flats)
    return jax.jit(put_experts)(pool, flats, jnp.asarray(idx[:, 0]), jnp.asarray(idx[:, 1]))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("as_list", [False, True], ids=["array", "rows"])
def test_scatter_equals_per_expert_writes_float(dtype, as_list):
    rng = np.random.default_rng(0)
    pool = ExpertPool(gate=jnp.asarray(rng.normal(size=(L, S, D, F)), dtype),
                      up=jnp.asarray(rng.normal(size=(L, S, D, F)), dtype),
                      down=jnp.asarray(rng.normal(size=(L, S, F, D)), dtype))
    flats = rng.normal(size=(len(WRITES), 3 * D * F)).astype(dtype)
    _assert_same(_scatter(pool, flats, WRITES, as_list), _sequential(pool, flats, WRITES))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=8), QuantSpec(bits=8, group_size=8, method="hqq")])
def test_scatter_equals_per_expert_writes_quantized(spec):
    rng = np.random.default_rng(1)
    host = quantize_experts({"gate": rng.normal(size=(len(WRITES), D, F)).astype(np.float32),
                             "up": rng.normal(size=(len(WRITES), D, F)).astype(np.float32),
                             "down": rng.normal(size=(len(WRITES), F, D)).astype(np.float32)}, spec)
    flats = np.stack([expert_bytes(host, e) for e in range(len(WRITES))])  # u8[n, B]
    pool = jax.tree.map(lambda a: jnp.zeros((L, S, *a.shape[1:]), a.dtype), host)
    got, want = _scatter(pool, flats, WRITES), _sequential(pool, flats, WRITES)
    _assert_same(got, want)
    assert np.asarray(got.gate).any()  # something was written


def test_layer_program_writes_a_bf16_pool_without_converting_it():
    """The layer mode's expert program with 18 misses (the bench's 3-token prefill) into 2 MoE layers × 31 slots of
    DeepSeek-V2-Lite bf16 experts under bf16 compute (abstract inputs: nothing is allocated) holds less than the
    pool's own bytes in temporaries; with one scatter per leaf it held 3.1 GiB (the pool converted to f32 and back)."""
    from jax.sharding import SingleDeviceSharding
    from ef_jax import random_checkpoint
    from ef_jax.config import from_hf_config
    from ef_jax.engine.programs.layer import offloaded_expert_pass
    from ef_jax.models.moe import Routing
    cfg = from_hf_config(random_checkpoint.hf_config("deepseek-v2-lite", 3))
    layers, slots, misses, tokens = 2, 31, 18, 16
    d, f, E, k = cfg.hidden_size, cfg.moe_intermediate, cfg.num_experts, cfg.top_k
    sd, bf16, f32, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32, jnp.int32
    pool = ExpertPool(gate=sd((layers, slots, d, f), bf16), up=sd((layers, slots, d, f), bf16),
                      down=sd((layers, slots, f, d), bf16))
    stack = sd((E, 3 * d * f), bf16, sharding=SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))
    routing = Routing(logits=sd((tokens, E), f32), experts=sd((tokens, k), i32), weights=sd((tokens, k), f32))
    compiled = offloaded_expert_pass.lower(
        cfg, False, {}, sd((1, tokens, d), bf16), sd((tokens, d), bf16), routing, sd((tokens, k), f32), pool,
        sd((layers, E), i32), sd((), i32), (stack,) * misses, sd((misses, 4), i32), sd((), jnp.bool_),
        kernel="xla").compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    pool_bytes = 3 * layers * slots * d * f * 2
    assert temp < pool_bytes, f"{temp / 2**20:.0f} MiB of temporaries for a {pool_bytes / 2**20:.0f} MiB pool"
