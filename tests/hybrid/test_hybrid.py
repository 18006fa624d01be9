"""Hybrid cross-layer predictor: the engine's record, the head (starts as pre-gating, learns what pre-gating cannot
see), the decay fit, and the record → train-hybrid → eval-policy --hybrid pipeline."""
import json

import numpy as np
import pytest

import ef_jax
from ef_jax.hybrid import model as hm
from ef_jax.hybrid.record import Record, record


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    d = tiny_checkpoint("qwen3moe-norm")
    return d, ef_jax.load(d)


def test_record_matches_the_model(tiny):
    _, model = tiny
    ids = np.random.default_rng(0).integers(0, 96, 70).tolist()
    rec = record(model, ids, seq_len=32)
    L = model.config.num_moe_layers
    assert rec.hidden.shape == (70, L, model.config.hidden_size) and rec.offsets.tolist() == [0, 32, 64, 70]
    want = np.concatenate([ef_jax.trace_routing(model, [ids[i:i + 32]]) for i in (0, 32, 64)])
    np.testing.assert_array_equal(np.sort(rec.experts, -1), np.sort(want, -1))
    assert rec.tokens.tolist() == ids and rec.point == "moe"


def test_record_at_the_attention_point(tiny, tmp_path):
    """The attention point records each layer's MoE input: that layer's own router on it gives exactly its
    routed experts (qwen3moe: plain top-k). The point survives save/load; records without it are layer outputs."""
    _, model = tiny
    ids = np.random.default_rng(2).integers(0, 96, 40).tolist()
    rec = record(model, ids, seq_len=40, point="attention")
    assert rec.point == "attention"
    hn = hm.rms(rec.hidden, rec.eps)                                              # [N, L, D]
    for j in range(rec.hidden.shape[1]):
        z = (hn[:, j] * rec.norms[j]) @ rec.routers[j]
        top = np.sort(np.argsort(-z, -1)[:, :rec.experts.shape[-1]], -1)
        np.testing.assert_array_equal(top, np.sort(rec.experts[:, j], -1))
    rec.save(str(tmp_path / "a.npz"))
    assert Record.load(str(tmp_path / "a.npz")).point == "attention"
    with np.load(str(tmp_path / "a.npz")) as z:
        np.savez(str(tmp_path / "old.npz"), **{k: z[k] for k in z.files if k != "point"})
    assert Record.load(str(tmp_path / "old.npz")).point == "moe"
    with pytest.raises(ValueError, match="point='mid' must be"):
        record(model, ids, point="mid")


def _synthetic(N=3000, L=3, E=8, K=2, D=8, seed=0):
    """Layer t's experts = the previous token's experts at t (a pattern pre-gating cannot see); random routers."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((N, L, K), np.int16)
    cur = rng.permuted(np.tile(np.arange(E), (L, 1)), axis=-1)[:, :K]
    for n in range(N):
        if rng.random() < 0.1:  # occasional fresh routes keep every expert in play
            cur = rng.permuted(np.tile(np.arange(E), (L, 1)), axis=-1)[:, :K]
        ex[n] = cur
    return Record(hidden=rng.standard_normal((N, L, D)).astype(np.float16), experts=ex,
                  tokens=rng.integers(0, 50, N).astype(np.int32), offsets=np.array([0, N]),
                  routers=rng.standard_normal((L, D, E)).astype(np.float32), norms=np.ones((L, D), np.float32),
                  vocab=50, eps=1e-6)


def test_untrained_head_is_pregating_and_training_beats_it():
    from ef_jax.hybrid import train_from_record
    rec = _synthetic()
    cfg = hm.HybridConfig(num_layers=3, num_experts=8, top_k=2, hidden=8, vocab=50, max_distance=2)
    f = hm.features(cfg, rec, list(rec.routers), list(rec.norms))
    np.testing.assert_allclose(np.asarray(hm.head_logits(hm.init_params(cfg), cfg, f)), f["zpg"], atol=1e-5)
    report = train_from_record(rec, None, max_distance=2, steps=400, log=lambda s: None)
    assert report["recall_hybrid"][0] > report["recall_pregate"][0] + 0.3
    assert report["recall_hybrid"][0] > 0.8


def test_exponential_fit_recovers_a_curve():
    s = np.arange(1, 9)
    fit = hm.fit_exp_decay(s, 0.5 * np.exp(-0.4 * s) + 0.2)
    assert fit["a"] == pytest.approx(0.5, abs=0.01) and fit["b"] == pytest.approx(0.4, abs=0.02)
    assert fit["c"] == pytest.approx(0.2, abs=0.01)


def test_record_train_and_use_through_the_cli(tiny, tmp_path, capsys):
    from ef_jax.cli.commands import main
    d, model = tiny
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(map(str, np.random.default_rng(1).integers(0, 96, 160))))
    rec, out = str(tmp_path / "rec.npz"), str(tmp_path / "hyb")
    assert main(["record", "--model", d, "--text", str(text), "--out", rec, "--seq-len", "64",
                 "--point", "attention"]) == 0
    assert main(["train-hybrid", rec, "--out", out, "--steps", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    L = model.config.num_moe_layers  # recall per distance 1 .. L - 1
    assert len(report["recall_hybrid"]) == L - 1 and all(0 <= r <= 1 for r in report["recall_pregate"])
    from ef_jax.hybrid import HybridPredictor
    from ef_jax.engine.sources.context import policy_context
    from ef_jax.policies.expertflow import ExpertFlow
    pol = ExpertFlow.from_context(policy_context(model), predictor=HybridPredictor.load(out, model))
    assert report["point"] == pol.hidden_point == "attention"  # the head runs where it was trained
    prompts = [[5, 17, 33, 2, 70], [88, 3, 60]]
    ref = ef_jax.generate(model, prompts, max_new_tokens=5).tokens
    res = ef_jax.generate(model, prompts, max_new_tokens=5,
                          offload=ef_jax.OffloadConfig(slots_per_layer=2, policy=pol, check=True))
    assert res.tokens == ref and res.stats["cache_prefetch_issued"] > 0
    # the same trained head inside the one-program step (ef_jax.engine.programs.device_hybrid)
    head = ef_jax.PolicySpec("expertflow", predictor=HybridPredictor.load(out, model))
    dev = ef_jax.generate(model, prompts, max_new_tokens=5,
                          offload=ef_jax.OffloadConfig(slots_per_layer=2, policy=head, step="device"))
    assert dev.tokens == ref and dev.stats["step"] == "device" and dev.stats["cache_prefetch_issued"] > 0
    assert main(["eval-policy", "--model", d, "--text", str(text), "--slots-per-layer", "3", "--hybrid", out,
                 "--max-tokens", "40", "--seq-len", "40", "--timing", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "expertflow"
