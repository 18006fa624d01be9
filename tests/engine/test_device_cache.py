"""device_cache.copy_rows: the copies read only the copied rows of the pinned-host stack (issue 24: XLA's CPU
backend hoisted the bf16→f32 upcast of the whole stack [E, W] out of the copy loop, a float32 copy of every
expert)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ef_jax.engine.programs.device_cache import copy_rows
from ef_jax.models.moe import ExpertPool

L, S, E, D, F = 1, 2, 16, 32, 64
W = 3 * D * F


def _inputs():
    dev = jax.devices()[0]
    rows = np.arange(E * W, dtype=np.float32).reshape(E, W).astype(jnp.bfloat16)
    stack = jax.device_put(rows, SingleDeviceSharding(dev, memory_kind="pinned_host"))
    zeros = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
    pool = ExpertPool(gate=zeros(L, S, D, F), up=zeros(L, S, D, F), down=zeros(L, S, F, D))
    return rows, stack, pool


def _copy(pool, stack, experts, slots, n):
    return copy_rows(pool, stack, 0, experts, slots, n)


def test_copy_rows_writes_the_rows():
    rows, stack, pool = _inputs()
    out = jax.jit(_copy)(pool, stack, jnp.array([5, 9], jnp.int32), jnp.array([1, 0], jnp.int32), jnp.int32(2))
    flat = lambda s: np.concatenate([np.asarray(a[0, s]).ravel() for a in (out.gate, out.up, out.down)])
    np.testing.assert_array_equal(flat(1), rows[5])
    np.testing.assert_array_equal(flat(0), rows[9])


def test_copy_rows_holds_no_copy_of_the_stack():
    _, stack, pool = _inputs()
    compiled = jax.jit(_copy).lower(pool, stack, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32),
                                    jnp.int32(2)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < stack.nbytes // 2, f"{temp} bytes of temporaries for a {stack.nbytes}-byte stack"
