"""eval-policy harness and the engine's virtual clock: the clock reproduces the simulator, the CLI reports the
issue's JSON fields, offloading with exact routing leaves perplexity unchanged."""
import json

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.evalpolicy import evaluate_policy, split_sequences

FIELDS = ("hit_rate", "bytes_per_token", "stall_s_per_token", "prefetch_precision", "prefetch_recall", "mean_horizon",
          "perplexity")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoint):
    d = tiny_checkpoint("qwen3moe-norm")
    ids = np.random.default_rng(0).integers(0, 96, 120).tolist()
    path = tmp_path_factory.mktemp("text") / "ids.txt"
    path.write_text(" ".join(map(str, ids)))
    return d, ef_jax.load(d), ids, str(path)


def test_virtual_clock_engine_matches_simulator(tiny):
    """The engine on the virtual clock and the simulator replaying the engine's routing agree on every count and
    on stall to float precision (same timing model, same policy code)."""
    from ef_jax.sim import TIMING_PRESETS, replay
    _, model, ids, _ = tiny
    for policy in ("lru", "nocache"):
        offload = OffloadConfig(slots_per_layer=3, policy=policy, timing="h100")
        from ef_jax.engine.forward.forward import Forward
        fwd = Forward(model, offload)
        from ef_jax.engine.loop.decode import teacher_forced
        teacher_forced(fwd, np.asarray([ids[:40]], np.int32))
        trace = np.sort(np.concatenate(fwd.source.routing_log), axis=-1)  # the engine requires a layer's experts sorted
        sim = replay(trace, slots_per_layer=3, policy=policy, timing="h100", num_experts=model.config.num_experts)
        s = fwd.stats()
        assert (s["hits"], s["misses"], s["h2d_bytes"]) == (sim.hits, sim.misses, sim.bytes_h2d)
        assert s["stall_s"] == pytest.approx(sim.stall_s, rel=1e-9) and s["stall_s"] > 0
        assert s["virtual_total_s"] == pytest.approx(sim.total_s, rel=1e-9)
        assert s["h2d_bytes"] == s["cache_loads"] * TIMING_PRESETS["h100"].expert_bytes


def test_exact_offloading_keeps_perplexity(tiny):
    _, model, ids, _ = tiny
    ref = evaluate_policy(model, ids, None, seq_len=30, max_tokens=60)
    got = evaluate_policy(model, ids, OffloadConfig(slots_per_layer=2, policy="expertflow", timing="h100"),
                          seq_len=30, max_tokens=60)
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    assert (got.argmax == ref.argmax).all()
    assert ref.tokens == got.tokens == 58 and ref.bytes_per_token == 0 and got.bytes_per_token > 0


def test_eval_policy_cli_json(tiny, capsys):
    from ef_jax.cli.commands import main
    d, _, _, text = tiny
    assert main(["eval-policy", "--model", d, "--text", text, "--slots-per-layer", "4", "--policy", "expertflow",
                 "--timing", "h100", "--max-tokens", "50", "--seq-len", "25", "--batch-size", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    for k in FIELDS:
        assert isinstance(rec[k], float), k
    assert 0 <= rec["hit_rate"] <= 1 and rec["mean_horizon"] >= 1 and rec["stall_s_per_token"] >= 0
    assert rec["tokens"] == 48 and rec["batch_size"] == 2
    assert main(["eval-policy", "--model", d, "--text", text, "--policy", "lru"]) == 2  # no budget: one-line error


def test_split_sequences():
    groups = split_sequences(list(range(23)), seq_len=5, batch_size=2, max_tokens=None)
    assert len(groups) == 2 and groups[0].shape == (2, 5)
    assert groups[1][1].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="too few"):
        split_sequences([1, 2], seq_len=5, batch_size=2, max_tokens=None)


def test_bench_policies_tiny_mode_runs(tmp_path):
    from tests.bench_loader import load_benchmark
    bench = load_benchmark("bench_policies")
    assert bench.main(["--tiny", "--out", str(tmp_path), "--budgets", "0.5", "--batches", "1", "2", "--policies",
                       "resident", "lru", "expertflow", "expertflow+cache-aware"]) == 0
    rec = json.load(open(tmp_path / "policies_tiny.json"))
    rows = rec["rows"]
    assert {r["policy"] for r in rows} >= {"resident", "lru", "expertflow", "expertflow+cache-aware", "belady (sim)"}
    assert all(r["tokens_per_s"] > 0 for r in rows) and rec["clock"] == "virtual h100"
    lru = next(r for r in rows if r["policy"] == "lru" and r["batch"] == 1)
    bel = next(r for r in rows if r["policy"] == "belady (sim)" and r["batch"] == 1)
    assert bel["mb_per_token"] <= lru["mb_per_token"]  # Belady is the demand-paging bound on the same routing
    assert (tmp_path / "policies_tiny.md").read_text().startswith("# Cache policies")


def test_eval_policy_keeps_real_bytes_beside_preset_bytes(tiny, capsys):
    from ef_jax.cli.commands import main
    d, model, _, text = tiny
    argv = ["eval-policy", "--model", d, "--text", text, "--slots-per-layer", "4", "--policy", "lru", "--timing",
            "h100", "--max-tokens", "50", "--seq-len", "25"]
    assert main(argv + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    preset, per_expert = 17_301_504, model.param_bytes()["per_expert"]
    assert rec["bytes_per_token"] > 0
    assert rec["real_bytes_per_token"] * preset == pytest.approx(rec["bytes_per_token"] * per_expert)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "at the h100 preset's expert size" in out and "really moved" in out
