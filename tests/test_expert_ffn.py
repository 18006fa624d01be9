"""kernels_pallas.expert_ffn against its plain-jnp reference (Pallas interpret mode on CPU, natively on a GPU)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas import BlockSizes, expert_ffn, expert_ffn_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _case(seed, T, K, S, D, F, dtype=jnp.float32, dup=False):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(T, D), dtype)
    slots = rs.randint(0, S, (T, K))
    if dup:  # a token naming the same slot twice, and every token sharing slot 0
        slots[:, 0] = 0
        slots[0, -1] = slots[0, 0]
    w = jnp.asarray(rs.rand(T, K), jnp.float32)
    pools = [jnp.asarray(rs.randn(*shape) * 0.1, dtype) for shape in ((S, D, F), (S, D, F), (S, F, D))]
    return x, jnp.asarray(slots, jnp.int32), w, *pools


def _check(args, interpret=True, regime=None, block_sizes=None):
    x = args[0]
    out = expert_ffn(*args, interpret=interpret, regime=regime, block_sizes=block_sizes)
    ref = expert_ffn_reference(*args)
    assert out.shape == x.shape and out.dtype == x.dtype
    scale = float(jnp.abs(ref.astype(jnp.float32)).max()) + 1e-6
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= TOL[x.dtype.type] * scale, (err, scale)


def test_reference_matches_naive_loop():
    x, slots, w, g, u, d = _case(0, 3, 2, 4, 16, 24)
    want = np.zeros((3, 16), np.float32)
    for t in range(3):
        for k in range(2):
            s = int(slots[t, k])
            h = jax.nn.silu(x[t] @ g[s]) * (x[t] @ u[s])
            want[t] += float(w[t, k]) * np.asarray(h @ d[s])
    np.testing.assert_allclose(np.asarray(expert_ffn_reference(x, slots, w, g, u, d)), want, atol=1e-5)


SHAPES = st.tuples(st.integers(1, 21), st.integers(1, 4), st.integers(1, 6), st.sampled_from([16, 32]),
                   st.sampled_from([16, 48, 64]), st.booleans())


@settings(max_examples=6, deadline=None)
@given(SHAPES, st.sampled_from(["decode", "prefill"]), st.integers(0, 2**16))
def test_kernel_matches_reference(shape, regime, seed):
    T, K, S, D, F, dup = shape
    _check(_case(seed, T, K, S, D, F, dup=dup), regime=regime, block_sizes=BlockSizes(block_f=16, block_d=16, block_m=8))


@pytest.mark.parametrize("regime", ["decode", "prefill"])
def test_bfloat16(regime):
    _check(_case(3, 5, 2, 4, 32, 32, jnp.bfloat16), regime=regime, block_sizes=BlockSizes(block_m=16))


def test_regime_chosen_by_token_count():
    # T = 1 (decode) and T = 40, not a multiple of the row tile (prefill), through the default choice.
    _check(_case(4, 1, 2, 5, 32, 64))
    _check(_case(5, 40, 2, 5, 32, 64), block_sizes=BlockSizes(block_m=16))


def test_wrapper_errors():
    x, slots, w, g, u, d = _case(0, 2, 2, 3, 16, 32)
    with pytest.raises(ValueError, match="w_down must be"):
        expert_ffn(x, slots, w, g, u, g, interpret=True)
    with pytest.raises(ValueError, match="slot_ids must be int32"):
        expert_ffn(x, slots.astype(jnp.float32), w, g, u, d, interpret=True)
    with pytest.raises(ValueError, match="weights must match"):
        expert_ffn(x, slots, w[:, :1], g, u, d, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        expert_ffn(x, slots, w, g.astype(jnp.bfloat16), u, d, interpret=True)
    with pytest.raises(ValueError, match="regime="):
        expert_ffn(x, slots, w, g, u, d, interpret=True, regime="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_gpu(regime, dtype):
    _check(_case(7, 4 if regime == "decode" else 300, 6, 16, 256, 256, dtype), interpret=False, regime=regime)


def test_bench_tiny_mode_runs(tmp_path):
    import json
    from tests.bench_loader import load_benchmark
    bench = load_benchmark("bench_expert_ffn")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "expert_ffn_tiny.json"))["rows"]
    assert {r["impl"] for r in rows} == {"pallas", "take_einsum", "ragged_dot"} and all(r["median_s"] > 0 for r in rows)
