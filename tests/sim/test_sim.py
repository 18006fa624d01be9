"""Simulator: trace files, the timing model on hand-computed cases, batching, the real-trace reproduction, CLI."""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from ef_jax.cache import ExpertCache
from ef_jax.policies import BasePolicy, Belady
from ef_jax.sim import TIMING_PRESETS, Timing, load_trace, make_trace, replay, save_trace
from ef_jax.cli import sim as cli

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing"
REAL_TRACE = DATA / "deepseek-v2-lite-puffin-dev.npz"


def random_trace(N=60, L=3, K=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E))
    return np.stack([[rng.choice(E, K, replace=False, p=p) for _ in range(L)] for _ in range(N)]).astype(np.uint8)


def tiny_trace_file(tmp_path, N=30):
    x = random_trace(N=N)
    trace = make_trace(x, np.array([0, 10, N]), np.array([7, 9], np.int32),
                       b"".join(f"t{i}".encode() + b"\0" for i in range(N)))
    path = tmp_path / "tiny.npz"
    save_trace(path, trace)
    return path, trace


# ---- trace files ---------------------------------------------------------------------------------------------
def test_trace_round_trip(tmp_path):
    path, trace = tiny_trace_file(tmp_path)
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, trace.experts)
    assert back.offsets.tolist() == [0, 10, 30] and back.prompt_id.tolist() == [7, 9]
    assert back.token_strings()[:2] == ["t0", "t1"] and back.prompt(1).shape == (20, 3, 2)


def test_malformed_traces_are_named(tmp_path):
    x = random_trace(N=4)
    good = dict(experts=x, offsets=np.array([0, 4]), prompt_id=np.array([1], np.int32),
                tokens=np.frombuffer(b"a\0b\0c\0d\0", np.uint8))
    cases = [
        (dict(good, experts=x.astype(np.int64)), "experts must be uint8"),
        (dict(good, offsets=np.array([0, 3])), "offsets must rise from 0 to N=4"),
        (dict(good, prompt_id=np.array([1, 2], np.int32)), "prompt_id has shape"),
        (dict(good, tokens=np.frombuffer(b"a\0b\0", np.uint8)), "tokens hold 2 NUL-terminated strings"),
        ({k: v for k, v in good.items() if k != "offsets"}, r"missing arrays \['offsets'\]"),
    ]
    for i, (arrays, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=message):
            load_trace(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_trace(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "absent.npz")


# ---- timing model --------------------------------------------------------------------------------------------
ONE_SECOND_COPIES = dict(h2d_bytes_per_s=100.0, expert_bytes=100)  # every copy takes 1 s


def test_free_copies_never_stall():
    x = random_trace()
    s = replay(x, slots_per_layer=3, policy="lru", timing=Timing(math.inf, 10**7, 1e-3))
    assert s.stall_s == 0 and s.total_s == pytest.approx(60 * 3 * 1e-3)
    assert s.bytes_h2d == s.loads * 10**7 and s.misses > 0


def test_nocache_stall_is_every_copy_in_series():
    # 3 tokens × 2 layers × 2 experts = 12 demand copies of 1 s each; nothing overlaps them (a copy is only
    # issued when its layer is routed, and the layer waits for it), so stall = 12 s, total = 12 + 6 × 0.5 s.
    x = np.array([[[0, 1], [2, 3]]] * 3, np.uint8)
    s = replay(x, slots_per_layer=2, policy="nocache", timing=Timing(**ONE_SECOND_COPIES, layer_compute_s=0.5))
    assert (s.hits, s.misses, s.loads) == (0, 12, 12)
    assert s.stall_s == pytest.approx(12.0) and s.total_s == pytest.approx(15.0)
    lru = replay(x, slots_per_layer=2, policy="lru", timing=Timing(**ONE_SECOND_COPIES, layer_compute_s=0.5))
    assert lru.loads == 4 and lru.stall_s == pytest.approx(4.0) and lru.hit_rate == pytest.approx(8 / 12)


class NextLayerOracle(BasePolicy):
    """Prefetches the next layer's experts of the same token as soon as a layer is routed (test-only)."""
    name = "next-layer-oracle"

    def __init__(self, x):
        self.x = x

    def on_route(self, layer, experts, view):
        if layer + 1 < self.x.shape[1]:
            return [(layer + 1, int(e)) for e in self.x[view.step, layer + 1]]
        return []

    def victim(self, layer, candidates, view):
        return min(candidates)


@pytest.mark.parametrize("compute_s, stall, total, hits, late", [
    # layer 0: demand copy 0→1 s, compute 1→3 s; the prefetch of layer 1 copies 1→2 s, so layer 1 hits at 3 s.
    (2.0, 1.0, 5.0, 1, 0),
    # compute 1→1.5 s; layer 1 is routed at 1.5 s, the prefetch lands at 2 s: a late prefetch (miss, no copy).
    (0.5, 1.5, 2.5, 0, 1),
])
def test_prefetch_overlaps_compute(compute_s, stall, total, hits, late):
    x = np.array([[[0], [1]]], np.uint8)
    s = replay(x, slots_per_layer=2, policy=NextLayerOracle(x), num_experts=2,
               timing=Timing(**ONE_SECOND_COPIES, layer_compute_s=compute_s))
    assert (s.hits, s.late, s.loads, s.prefetch_issued, s.prefetch_used) == (hits, late, 2, 1, 1)
    assert s.stall_s == pytest.approx(stall) and s.total_s == pytest.approx(total)


def test_h100_preset_is_deepseek_v2_lite_over_pcie5():
    t = TIMING_PRESETS["h100"]
    assert t.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504
    assert t.copy_s == pytest.approx(17_301_504 / 50e9)
    with pytest.raises(ValueError, match="h2d_bytes_per_s=0"):
        Timing(0, 1, 1)


# ---- batching --------------------------------------------------------------------------------------------------
def test_batch_needs_the_union():
    x = np.array([[[0, 1]], [[1, 2]], [[2, 3]]], np.uint8)  # steps: {0,1,2}, then {2,3}
    s = replay(x, slots_per_layer=3, policy="lru", batch_size=2)
    assert (s.steps, s.hits, s.misses) == (2, 1, 4)
    with pytest.raises(ValueError, match="3 experts needed at layer 0 but only 2 slots"):
        replay(x, slots_per_layer=2, batch_size=2)


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_batched_replay_equals_driving_the_cache_with_unions(policy):
    x = random_trace(N=41, K=2, E=10, seed=3)
    B, S = 3, 7
    s = replay(x, slots_per_layer=S, policy=policy, batch_size=B, num_experts=10)
    pol = policy
    if policy == "belady":
        pol = Belady(x, batch_size=B)
    cache = ExpertCache(3, 10, S, pol, check=True)
    for t0 in range(0, 41, B):
        cache.begin_step()
        for l in range(3):
            cache.route(l, np.unique(x[t0:t0 + B, l]).tolist())
            cache.arrive_all()
            cache.release(l)
        cache.end_step()
    assert (s.hits, s.misses, s.loads) == (cache.hits, cache.misses, cache.loads)
    if policy == "belady":
        assert s.hits >= replay(x, slots_per_layer=S, policy="lru", batch_size=B).hits


# ---- the real trace: README figures over the first 20,000 tokens ------------------------------------------------
README_FIGURES = {("lru", 16): 0.471, ("belady", 16): 0.663, ("lru", 32): 0.708, ("belady", 32): 0.869}


def _real_hit_rate(policy_slots):
    policy, slots = policy_slots
    experts = load_trace(REAL_TRACE).experts[:20_000]
    return replay(experts, slots_per_layer=slots, policy=policy).hit_rate


@pytest.mark.skipif(not REAL_TRACE.exists(), reason=f"routing trace not found at {REAL_TRACE}")
def test_real_trace_reproduces_readme_hit_rates():
    # 4 independent replays of ~0.5 M layer-steps each: spread over processes ("spawn": jax is loaded here).
    jobs = list(README_FIGURES)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        rates = dict(zip(jobs, pool.map(_real_hit_rate, jobs)))
    for key, expected in README_FIGURES.items():
        assert rates[key] == pytest.approx(expected, abs=0.01), key
        assert rates[key] == pytest.approx(expected, abs=0.0006), key  # in fact, to the printed digits


@pytest.mark.skipif(not REAL_TRACE.exists(), reason=f"routing trace not found at {REAL_TRACE}")
def test_real_trace_prefix_belady_is_never_beaten():
    x = load_trace(REAL_TRACE).experts[:1500]
    best = replay(x, slots_per_layer=12, policy="belady").hits
    for name in ("lru", "lfu"):
        assert replay(x, slots_per_layer=12, policy=name).hits <= best


# ---- CLI -------------------------------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(prog="ef-jax")
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_json(tmp_path, capsys):
    path, _ = tiny_trace_file(tmp_path)
    args = parse(["sim", str(path), "--slots-per-layer", "4", "--policy", "belady", "--tokens", "20",
                  "--batch-size", "2", "--json"])
    assert args.func is cli.run and cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "belady" and out["tokens"] == 20 and out["steps"] == 10 and out["timing"] == "h100"
    assert out["hits"] + out["misses"] > 0 and out["stall_s"] >= 0 and len(out["layer_hit_rate"]) == 3


def test_cli_summary_and_errors(tmp_path, capsys):
    path, _ = tiny_trace_file(tmp_path)
    assert cli.run(parse(["sim", str(path), "--slots-per-layer", "4"])) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "MB/token" in out and "ms/token" in out
    for name in ("fifo", "pregate"):  # unknown, or model-bound (it needs router weights): argparse refuses it
        with pytest.raises(SystemExit):
            parse(["sim", str(path), "--slots-per-layer", "4", "--policy", name])
        assert "invalid choice" in capsys.readouterr().err
    assert cli.run(parse(["sim", str(tmp_path / "none.npz"), "--slots-per-layer", "4"])) == 2


def test_cli_labels_preset_bytes_and_takes_the_models(tmp_path, capsys):
    path, _ = tiny_trace_file(tmp_path)
    assert cli.run(parse(["sim", str(path), "--slots-per-layer", "4", "--json"])) == 0
    preset = json.loads(capsys.readouterr().out)
    assert preset["expert_bytes_from"] == "preset" and preset["expert_bytes"] == 17_301_504
    assert cli.run(parse(["sim", str(path), "--slots-per-layer", "4", "--expert-bytes", "73728", "--json"])) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["expert_bytes"] == 73728 and own["misses"] == preset["misses"]
    assert own["bytes_per_token"] * 17_301_504 == pytest.approx(preset["bytes_per_token"] * 73728)
    assert cli.run(parse(["sim", str(path), "--slots-per-layer", "4"])) == 0
    out = capsys.readouterr().out
    assert "17.3 MB experts (the h100 preset's; --expert-bytes" in out and "ms total" in out


def test_save_trace_from_arrays(tmp_path):
    x = random_trace(N=5).astype(np.int32)  # as trace_routing returns it
    save_trace(tmp_path / "a.npz", x, np.array([0, 2, 5]), None, ["a", "b", "c", "dé", "e"])
    back = load_trace(tmp_path / "a.npz")
    assert back.experts.dtype == np.uint8 and np.array_equal(back.experts, x)
    assert back.prompt_id.tolist() == [0, 1] and back.token_strings() == ["a", "b", "c", "dé", "e"]
    with pytest.raises(ValueError, match="uint8"):
        save_trace(tmp_path / "b.npz", x + 300)


def test_main_cli_dispatches_sim(tmp_path, capsys):
    ef_cli = pytest.importorskip("ef_jax.cli.commands")
    path, _ = tiny_trace_file(tmp_path)
    assert ef_cli.main(["sim", str(path), "--slots-per-layer", "4", "--timing", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stall_s"] is None and out["policy"] == "lru"
