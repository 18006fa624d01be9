"""Routing-path predictor: packing, causality, step-by-step = whole-trace scoring, learning what the lookup table
cannot, checkpoint round trip, and the train-predictor / eval-predictor commands."""
import json

import jax
import numpy as np
import pytest

from ef_jax.predict import TokenLookupBaseline, recall_at_k
from ef_jax.predict.path_predictor import PAD, UNK, PathPredictor, PredictorConfig, Vocab, pack, score_packed
from ef_jax.predict.runtime import TrainedPredictor
from ef_jax.predict.train import TrainConfig, fit, load_predictor, prompt_slice, save_predictor
from ef_jax.trace import make_trace, save_trace

L, E, K = 2, 8, 2


def context_trace(prompts=40, length=12, seed=0):
    """Token t's experts are a function of token t-1's word (the first token of a prompt: {0, 1}), so neither a
    per-token lookup nor the previous route predicts them; a model with context does."""
    rng = np.random.default_rng(seed)
    words, experts = [], []
    for _ in range(prompts):
        w = rng.integers(0, 4, length)
        for t in range(length):
            base = 0 if t == 0 else 2 * (int(w[t - 1]) + 1)
            experts.append([[(base + l) % E, (base + l + 1) % E] for l in range(L)])
            words.append(f"w{w[t]}")
    offsets = np.arange(0, prompts * length + 1, length)
    return make_trace(np.array(experts, np.uint8), offsets, np.arange(prompts, dtype=np.int32),
                      b"".join(s.encode() + b"\0" for s in words))


def tiny_cfg(vocab_size, **kw):
    return PredictorConfig(**{**dict(vocab_size=vocab_size, num_layers=L, num_experts=E, top_k=K, d_model=32,
                                     num_heads=2, depth=1, d_ff=64, window=16, dropout=0.0), **kw})


def test_vocab_reserves_pad_and_unk():
    v = Vocab.build(["a", "b", "a", "c", "a", "b"], min_count=2)
    assert v.encode(["a", "b", "c", "zzz"]).tolist() == [2, 3, UNK, UNK] and len(v) == 4 and PAD == 0


def test_pack_places_every_token_once_with_its_previous_route():
    tr = context_trace(prompts=5, length=7)
    ids = np.arange(tr.num_tokens, dtype=np.int32) + 2
    p = pack(ids, tr.experts, tr.offsets, window=10)
    w, pos = p.where[:, 0], p.where[:, 1]
    assert len(set(zip(w.tolist(), pos.tolist()))) == tr.num_tokens             # no two tokens share a position
    np.testing.assert_array_equal(p.tokens[w, pos], ids)
    np.testing.assert_array_equal(p.target[w, pos], tr.experts)
    starts = tr.offsets[:-1]
    assert (p.prev[w[starts], pos[starts]] == -1).all()                         # a prompt starts with no route
    rest = np.setdiff1d(np.arange(tr.num_tokens), starts)
    np.testing.assert_array_equal(p.prev[w[rest], pos[rest]], tr.experts[rest - 1])
    assert (p.segment > 0).sum() == tr.num_tokens


def test_scores_are_causal_and_prompts_packed_together_do_not_interact():
    tr = context_trace(prompts=3, length=5)
    cfg = tiny_cfg(8)
    params = PathPredictor(cfg).init(jax.random.key(0), np.zeros((1, 16), np.int32), np.ones((1, 16), np.int32),
                                     np.zeros((1, 16, L, K), np.int32))["params"]
    ids = np.arange(tr.num_tokens, dtype=np.int32) % 6 + 2
    base = score_packed(cfg, params, pack(ids, tr.experts, tr.offsets, 16))
    changed = ids.copy()
    changed[7] = 7                                  # prompt 1, position 2
    alt = score_packed(cfg, params, pack(changed, tr.experts, tr.offsets, 16))
    np.testing.assert_allclose(alt[:7], base[:7], atol=1e-5)                     # earlier tokens and prompt 0
    np.testing.assert_allclose(alt[10:], base[10:], atol=1e-5)                   # prompt 2 (same window)
    assert np.abs(alt[7] - base[7]).max() > 1e-4                                 # the changed token itself


def test_step_by_step_matches_whole_trace_scoring():
    tr = context_trace(prompts=1, length=20)      # longer than the window: the stepper slides, pack cuts
    vocab = Vocab.build(tr.token_strings(), 1)
    cfg = tiny_cfg(len(vocab))
    params = PathPredictor(cfg).init(jax.random.key(1), np.zeros((1, 16), np.int32), np.ones((1, 16), np.int32),
                                     np.zeros((1, 16, L, K), np.int32))["params"]
    tp = TrainedPredictor(cfg, params, vocab)
    whole = tp.scores(tr)
    step = tp.stepper(id_to_token=lambda i: f"w{i}")
    step.reset(L, E)
    words = [int(s[1:]) for s in tr.token_strings()]
    for t in range(16):                             # inside the first window both see the same context
        got = step.predict(np.array([words[t]]))
        np.testing.assert_allclose(got[0], whole[t], atol=1e-4)
        for l in range(L):
            step.observe(l, tr.experts[t, l].tolist())


def test_learns_context_that_lookup_cannot():
    tr = context_trace(prompts=60)
    train, val = prompt_slice(tr, 0, 48), prompt_slice(tr, 48, 60)
    vocab = Vocab.build(train.token_strings(), 1)
    params, history = fit(train, tiny_cfg(len(vocab)), TrainConfig(batch=8, max_steps=300, lr=1e-2, warmup=10,
                                                                   eval_every=0), vocab, val=val, log=lambda s: None)
    lookup = recall_at_k(TokenLookupBaseline(E).fit(train).scores(val), val.experts).mean()
    assert history[-1]["val_recall"] > 0.9 > lookup + 0.3, (history[-1], lookup)


def test_checkpoint_round_trip(tmp_path):
    tr = context_trace(prompts=4)
    vocab = Vocab.build(tr.token_strings(), 1)
    cfg = tiny_cfg(len(vocab))
    params = PathPredictor(cfg).init(jax.random.key(2), np.zeros((1, 16), np.int32), np.ones((1, 16), np.int32),
                                     np.zeros((1, 16, L, K), np.int32))["params"]
    save_predictor(tmp_path / "p", cfg, params, vocab, {"note": 1})
    cfg2, params2, vocab2, meta = load_predictor(tmp_path / "p")
    assert cfg2 == cfg and vocab2.strings == vocab.strings and meta == {"note": 1}
    np.testing.assert_allclose(TrainedPredictor(cfg2, params2, vocab2).scores(tr),
                               TrainedPredictor(cfg, params, vocab).scores(tr), atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        save_predictor(tmp_path / "p", cfg, params, vocab, {})


def test_cli_train_then_eval_on_held_out_prompts(tmp_path, capsys):
    from ef_jax.cli.commands import main
    path = tmp_path / "ctx.npz"
    save_trace(path, context_trace(prompts=20))
    out = tmp_path / "pred"
    assert main(["train-predictor", str(path), "--out", str(out), "--max-steps", "3", "--d-model", "16",
                 "--window", "16", "--depth", "1", "--eval-every", "0"]) == 0
    assert "saved predictor" in capsys.readouterr().out
    assert main(["eval-predictor", str(out), str(path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompts_evaluated"] == [16, 20] and res["tokens"] == 4 * 12         # the last 20% only
    assert 0 <= res["mean_recall"] <= 1 and len(res["predictor"]["layer_recall"]) == L
    assert {"frequency", "previous_token", "token_lookup"} <= set(res["baselines"])
    assert main(["eval-predictor", str(tmp_path / "nothing"), str(path)]) == 2       # one-line error, exit 2
