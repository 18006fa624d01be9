"""put_experts (one scatter per pool leaf) writes what put_expert, row after row, writes: float and quantized
pools, a row overwritten later at the same (layer, slot) included."""
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


def _scatter(pool, flats, where):
    idx = np.asarray(where, np.int32)
    return jax.jit(put_experts)(pool, jnp.asarray(flats), jnp.asarray(idx[:, 0]), jnp.asarray(idx[:, 1]))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_scatter_equals_per_expert_writes_float():
    rng = np.random.default_rng(0)
    pool = ExpertPool(gate=jnp.asarray(rng.normal(size=(L, S, D, F)), jnp.float32),
                      up=jnp.asarray(rng.normal(size=(L, S, D, F)), jnp.float32),
                      down=jnp.asarray(rng.normal(size=(L, S, F, D)), jnp.float32))
    flats = rng.normal(size=(len(WRITES), 3 * D * F)).astype(np.float32)
    _assert_same(_scatter(pool, flats, WRITES), _sequential(pool, flats, WRITES))


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
