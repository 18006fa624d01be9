"""kernels_pallas.expert_ffn against its plain-jnp reference: Pallas interpret mode on CPU, natively on a GPU.

Axes: T tokens, K experts per token, S slots, D model width, F expert FFN width.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.bench_loader import load_benchmark
from kernels_pallas import BlockSizes, expert_ffn, expert_ffn_ragged_dot, expert_ffn_reference, pad_ffn

# Max error relative to max |reference|. Natively, Triton runs float32 dots in TF32 (10-bit mantissa) by default.
TOL = {(jnp.float32, True): 1e-5, (jnp.bfloat16, True): 2e-2,
       (jnp.float32, False): 5e-3, (jnp.bfloat16, False): 2e-2}
SMALL = BlockSizes(decode_block_f=16, decode_block_d=16, block_m=16, block_f=16, block_d=16)


def _case(seed, T, K, S, D, F, dtype=jnp.float32, dup=False):
    """Random tokens, routing and pools; dup makes every token share slot 0 and token 0 name it twice."""
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(T, D), dtype)
    slots = rs.randint(0, S, (T, K))
    if dup:
        slots[:, 0] = 0
        slots[0, -1] = 0
    w = jnp.asarray(rs.rand(T, K), jnp.float32)
    pools = [jnp.asarray(rs.randn(*shape) * 0.1, dtype) for shape in ((S, D, F), (S, D, F), (S, F, D))]
    return (x, jnp.asarray(slots, jnp.int32), w, *pools)


def _assert_close(out, ref, interpret=True):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    tol = TOL[(ref.dtype.type, interpret)]
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    err, scale = np.abs(out - ref).max(), np.abs(ref).max() + 1e-6
    assert err <= tol * scale, f"max error {err:.3g} > {tol} × max |ref| {scale:.3g}"


def _naive(x, slots, w, g, u, d):
    """Per-token, per-k Python loop in float64 numpy: the definition of the op."""
    x, g, u, d = (np.asarray(a, np.float64) for a in (x, g, u, d))
    y = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for k in range(slots.shape[1]):
            s = int(slots[t, k])
            a = x[t] @ g[s]
            y[t] += float(w[t, k]) * ((a / (1 + np.exp(-a))) * (x[t] @ u[s])) @ d[s]
    return y


def test_reference_matches_naive_loop():
    args = _case(0, 5, 3, 4, 16, 24, dup=True)
    np.testing.assert_allclose(np.asarray(expert_ffn_reference(*args)), _naive(*args), rtol=1e-5, atol=1e-5)


def test_ragged_dot_baseline_matches_reference():
    args = _case(1, 9, 2, 5, 16, 32, dup=True)
    _assert_close(expert_ffn_ragged_dot(*args), expert_ffn_reference(*args))


def test_pad_ffn_is_exact():
    x, slots, w, g, u, d = _case(2, 4, 2, 3, 16, 24)
    _assert_close(expert_ffn_reference(x, slots, w, *pad_ffn(g, u, d, 16)), expert_ffn_reference(x, slots, w, g, u, d))


class TestExpertFFN:
    """Kernel vs reference; rerun natively by TestExpertFFNGpu."""
    INTERPRET = True

    def check(self, args, **kw):
        out = expert_ffn(*args, interpret=self.INTERPRET, **kw)
        _assert_close(out, expert_ffn_reference(*args), self.INTERPRET)

    @settings(max_examples=8, deadline=None)
    @given(T=st.integers(1, 40), K=st.integers(1, 4), S=st.integers(1, 6), D=st.sampled_from([16, 32, 64]),
           F=st.sampled_from([16, 48, 64]), dup=st.booleans(), regime=st.sampled_from(["decode", "prefill"]),
           seed=st.integers(0, 2**16))
    def test_matches_reference(self, T, K, S, D, F, dup, regime, seed):
        self.check(_case(seed, T, K, S, D, F, dup=dup), regime=regime, block_sizes=SMALL)

    @pytest.mark.parametrize("regime", ["decode", "prefill"])
    def test_bfloat16(self, regime):
        self.check(_case(3, 5, 2, 4, 32, 48, jnp.bfloat16, dup=True), regime=regime, block_sizes=SMALL)

    def test_decode_atomic_combine(self):
        atomic = dataclasses.replace(SMALL, decode_combine="atomic")
        self.check(_case(8, 6, 3, 4, 32, 48, dup=True), regime="decode", block_sizes=atomic)

    def test_single_token_default_blocks(self):
        # T = 1 through the default choice (decode) with the default BlockSizes (blocks clipped to F and D).
        self.check(_case(4, 1, 2, 5, 64, 32))

    def test_prefill_tokens_not_a_multiple_of_the_tile(self):
        # 37 tokens × K=3 = 111 pairs over 5 slots: groups end mid-tile; chosen by T > decode_max_tokens.
        self.check(_case(5, 37, 3, 5, 32, 64), block_sizes=SMALL)

    def test_all_tokens_pick_the_same_slots(self):
        x, slots, w, g, u, d = _case(6, 20, 2, 8, 32, 32)
        slots = jnp.tile(jnp.array([[3, 5]], jnp.int32), (20, 1))
        for regime in ("decode", "prefill"):
            self.check((x, slots, w, g, u, d), regime=regime, block_sizes=SMALL)


@pytest.mark.gpu
class TestExpertFFNGpu(TestExpertFFN):
    INTERPRET = False


def test_wrapper_errors():
    x, slots, w, g, u, d = _case(0, 2, 2, 3, 16, 32)
    cases = [
        (dict(x=x[0]), "x must be"),
        (dict(w_down=g), "w_down must be"),
        (dict(w_up=u[:, :, :16]), "w_up must have"),
        (dict(slot_ids=slots.astype(jnp.float32)), "slot_ids must be int32"),
        (dict(slot_ids=slots[:1]), "slot_ids must be"),
        (dict(weights=w[:, :1]), "weights must match"),
        (dict(w_gate=g.astype(jnp.bfloat16)), "w_gate dtype"),
        (dict(x=x.astype(jnp.float16), w_gate=g.astype(jnp.float16), w_up=u.astype(jnp.float16),
              w_down=d.astype(jnp.float16)), "float32 or bfloat16"),
    ]
    base = dict(x=x, slot_ids=slots, weights=w, w_gate=g, w_up=u, w_down=d)
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            expert_ffn(**{**base, **change}, interpret=True)
    with pytest.raises(ValueError, match="regime="):
        expert_ffn(**base, interpret=True, regime="fast")
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_m=24)
    with pytest.raises(ValueError, match="decode_combine"):
        BlockSizes(decode_combine="sum")
    with pytest.raises(ValueError, match="pad_ffn"):  # F=24 has no ≥16 power-of-two block natively
        jax.jit(expert_ffn).trace(*_case(0, 2, 2, 3, 16, 24)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("T,combine", [(1, "partials"), (13, "atomic"), (300, "partials")])
def test_lowers_to_triton_for_cuda(T, combine):
    """Cross-lowers for an NVIDIA GPU on any machine: catches Pallas→Triton errors (tile shapes, ops) without a
    GPU. It does not compile to PTX, so register and shared-memory limits are checked only on a GPU."""
    D, F, K, S = 2048, 1408, 6, 64  # DeepSeek-V2-Lite
    sd = jax.ShapeDtypeStruct
    args = (sd((T, D), jnp.bfloat16), sd((T, K), jnp.int32), sd((T, K), jnp.float32),
            sd((S, D, F), jnp.bfloat16), sd((S, D, F), jnp.bfloat16), sd((S, F, D), jnp.bfloat16))
    fn = functools.partial(expert_ffn, block_sizes=BlockSizes(decode_combine=combine))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == (1 if T <= 16 else 2)


def test_bench_tiny_mode_runs(tmp_path):
    bench = load_benchmark("bench_expert_ffn")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "expert_ffn_tiny.json"))["rows"]
    assert {r["impl"] for r in rows} == {"pallas", "pallas_atomic", "take_einsum", "ragged_dot"}
    assert all(r["median_s"] > 0 for r in rows if r["median_s"] is not None)
    assert (tmp_path / "expert_ffn_tiny.md").read_text().startswith("# expert_ffn")


def test_tuned_table_round_trips(tmp_path, monkeypatch):
    """What the tuner's writer stores, the kernel's lookup returns, for that device kind and (D, F) only; a second
    write replaces its own entries and keeps the others."""
    import sys
    from kernels_pallas import tuned_block_sizes, tuned_table
    path = str(tmp_path / "tuned.json")
    assert tuned_block_sizes(path) == {}  # no file: an empty table, the defaults apply
    h100 = BlockSizes(decode_block_f=32, decode_block_d=512, block_m=128, block_f=64, block_d=64, num_warps=4)
    fields = {n: getattr(h100, n) for n in ("decode_block_f", "decode_block_d", "block_m", "block_f", "block_d",
                                            "num_warps")}
    tuned_table.write_entries(path, "NVIDIA H100", {(2048, 1408): fields}, {(2048, 1408): {"decode_ms": 0.1}})
    tuned_table.write_entries(path, "NVIDIA H200", {(2048, 1408): {"block_m": 128}})
    tuned_table.write_entries(path, "NVIDIA H200", {(2048, 1408): {"block_m": 32}, (4096, 14336): {}})
    table = tuned_block_sizes(path)
    assert table == {("NVIDIA H100", 2048, 1408): h100, ("NVIDIA H200", 2048, 1408): BlockSizes(block_m=32),
                     ("NVIDIA H200", 4096, 14336): BlockSizes()}
    monkeypatch.setattr(sys.modules["kernels_pallas.expert_ffn"], "_TUNED", table)
    assert BlockSizes.get_default("NVIDIA H100", 2048, 1408) == h100
    assert BlockSizes.get_default("NVIDIA H100", 2048, 768) == BlockSizes()
    assert BlockSizes.get_default("cpu", 2048, 1408) == BlockSizes()


@pytest.mark.parametrize("text,words", [
    ("{not json", "is not JSON"),
    ('{"format": 2, "entries": []}', "must be"),
    ('{"format": 1, "entries": [{"device_kind": "x", "D": 8}]}', "lacks"),
    ('{"format": 1, "entries": [{"device_kind": "x", "D": 8, "F": 0, "block_sizes": {}}]}', "F=0"),
    ('{"format": 1, "entries": [{"device_kind": "x", "D": 8, "F": 8, "block_sizes": {"tile": 16}}]}', "tile"),
    ('{"format": 1, "entries": [{"device_kind": "x", "D": 8, "F": 8, "block_sizes": {"block_m": 12}}]}',
     "power of two"),
    ('{"format": 1, "entries": [' + ','.join(['{"device_kind": "x", "D": 8, "F": 8, "block_sizes": {}}'] * 2)
     + ']}', "repeats"),
])
def test_malformed_tuned_table_is_a_clear_error(tmp_path, text, words):
    from kernels_pallas import tuned_block_sizes
    path = tmp_path / "tuned.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as e:
        tuned_block_sizes(str(path))
    assert str(path) in str(e.value)


def test_tuner_merges_the_fastest_of_each_regime():
    """bench_expert_ffn --tune: per regime the candidate fastest in total over its T's (only candidates that ran at
    every T count), merged into one set of BlockSizes fields."""
    bench = load_benchmark("bench_expert_ffn")
    d0, d1 = bench.TUNE_DECODE[:2]
    p0, p1 = bench.TUNE_PREFILL[:2]
    decode = [{d0: 1.0, d1: 2.0}, {d0: 3.0, d1: 1.5}]        # totals: d0 4.0, d1 3.5
    prefill = [{p0: 1.0, p1: 5.0}, {p1: 1.0}]                # p0 failed at the second T
    fields, measured = bench.best_block_sizes(decode, prefill)
    assert fields == {**{n: getattr(d1, n) for n in bench.DECODE_FIELDS},
                      **{n: getattr(p1, n) for n in bench.PREFILL_FIELDS}}
    assert measured == {"decode_ms_total": 3500.0, "prefill_ms_total": 6000.0}
    assert bench.best_block_sizes([], []) == ({}, {})
