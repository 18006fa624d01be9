"""ef_jax.generate's request handling: context-length refusal before any work, generation_config.json defaults,
the on_token callback, repetition penalty against a naive reference, compile time apart, one stats shape."""
import json
import os
import shutil

import numpy as np
import pytest

import ef_jax
from ef_jax.engine.loop.request import ContextLengthError
from ef_jax.generation_config import GenerationDefaults, read_generation_config, resolve_sampling

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint):
    return tiny_checkpoint("qwen3moe-norm")   # vocabulary 96, max_position_embeddings 256, no EOS


@pytest.fixture(scope="module")
def model(tiny_dir):
    return ef_jax.load(tiny_dir)


def _with_generation_config(tiny_dir, tmp_path, content) -> str:
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny_dir, d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return d


# ---- context length (item 1) -----------------------------------------------------------------------------------
def test_context_length_refused_before_any_work(model, monkeypatch):
    import ef_jax.engine.loop.generate as g

    def boom(*a, **k):
        raise AssertionError("the forward was built before the context check")
    monkeypatch.setattr(g, "Forward", boom)
    assert model.config.max_position_embeddings == 256
    with pytest.raises(ContextLengthError, match=r"250 tokens \+ max_new_tokens 7 = 257 positions.*"
                                                 r"max_position_embeddings=256.*at most 6"):
        ef_jax.generate(model, [[1] * 250], max_new_tokens=7)
    with pytest.raises(ContextLengthError, match="prompt 1 has 300 tokens.*shorten prompt 1"):
        ef_jax.generate(model, [[1, 2], [1] * 300], max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="max_position_embeddings"):  # batch_size= takes the same check
        ef_jax.generate(model, [[1, 2], [1] * 300], max_new_tokens=1, batch_size=1)
    with pytest.raises(ContextLengthError):  # a huge request is a clear refusal, not an out-of-memory error
        ef_jax.generate(model, [[1, 2]], max_new_tokens=100_000_000)


def test_context_length_exactly_at_the_limit_runs(model):
    res = ef_jax.generate(model, [[3] * 250], max_new_tokens=6)
    assert len(res.tokens[0]) == 6


# ---- generation_config.json defaults (item 6) -------------------------------------------------------------------
def test_resolve_sampling_follows_transformers_semantics():
    none = GenerationDefaults()
    r = resolve_sampling(none)
    assert (r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.repetition_penalty) == (64, 0.0, None, 1.0, 1.0)
    greedy_file = GenerationDefaults(do_sample=False, temperature=0.7, top_k=20, max_new_tokens=9)
    r = resolve_sampling(greedy_file)
    assert (r.max_new_tokens, r.temperature) == (9, 0.0)                   # do_sample false → greedy
    sample_file = GenerationDefaults(do_sample=True, temperature=0.6)
    r = resolve_sampling(sample_file)
    assert (r.temperature, r.top_k, r.top_p) == (0.6, 50, 1.0)              # transformers' defaults for the rest
    r = resolve_sampling(GenerationDefaults(do_sample=True, temperature=0.6, top_k=20, top_p=0.8),
                         temperature=0.0, top_k=0, max_new_tokens=3)
    assert (r.temperature, r.top_k, r.top_p, r.max_new_tokens) == (0.0, None, 0.8, 3)  # the caller's win; 0 = off
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        resolve_sampling(none, max_new_tokens=0)


def test_generate_applies_the_checkpoint_defaults(tiny_dir, tmp_path):
    d = _with_generation_config(tiny_dir, tmp_path, {"do_sample": True, "temperature": 0.8, "top_k": 10,
                                                     "top_p": 0.9, "max_new_tokens": 7})
    model = ef_jax.load(d)
    assert model.generation.max_new_tokens == 7 and model.generation.do_sample is True
    by_file = ef_jax.generate(model, [[3, 4, 5]], seed=3)
    explicit = ef_jax.generate(model, [[3, 4, 5]], seed=3, max_new_tokens=7, temperature=0.8, top_k=10, top_p=0.9)
    assert len(by_file.tokens[0]) == 7 and by_file.tokens == explicit.tokens
    greedy = ef_jax.generate(model, [[3, 4, 5]], temperature=0.0, top_k=0, top_p=1.0)
    plain = ef_jax.generate(ef_jax.load(tiny_dir), [[3, 4, 5]], max_new_tokens=7)
    assert greedy.tokens == plain.tokens                                    # explicit greedy overrides the file


def test_corrupt_generation_config_names_the_file(tiny_dir, tmp_path):
    d = _with_generation_config(tiny_dir, tmp_path, "{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        ef_jax.load(d)
    d2 = str(tmp_path / "ckpt2")
    shutil.copytree(tiny_dir, d2)
    with open(os.path.join(d2, "generation_config.json"), "w") as f:
        json.dump({"max_new_tokens": "many"}, f)
    with pytest.raises(ValueError, match=r"generation_config\.json: max_new_tokens='many' must be int"):
        read_generation_config(d2)


# ---- on_token (item 5) ------------------------------------------------------------------------------------------
def test_on_token_sees_every_token_in_order_and_can_end_a_row(model):
    seen = []
    res = ef_jax.generate(model, [[3, 4, 5], [7, 8]], max_new_tokens=6, on_token=lambda r, t: seen.append((r, t)))
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == res.tokens[row]
    ref = res.tokens[0]
    cut = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=6, on_token=lambda r, t: t == ref[2])
    assert cut.tokens[0] == ref[: ref.index(ref[2]) + 1]
    streamed = []  # with batch_size the callback gets each token's prompt index, whatever its batch
    batched = ef_jax.generate(model, [[3, 4, 5], [7, 8]], max_new_tokens=6, batch_size=1,
                              on_token=lambda r, t: streamed.append((r, t)))
    assert [[t for r, t in streamed if r == row] for row in (0, 1)] == batched.tokens == res.tokens


# ---- repetition penalty (item 15) -------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers_processor():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from ef_jax.engine.loop.penalty import SeenTokens, apply_repetition_penalty
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 11)).astype(np.float32)
    ids = [[1, 4, 4, 9], [0, 2]]
    tokens = np.array([[1, 4, 4, 9], [0, 0, 0, 2]], np.int32)
    valid = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)    # row 1 left-padded: the pads are not tokens
    seen = SeenTokens(tokens, valid, 11)
    ours = np.asarray(apply_repetition_penalty(logits, seen.mask, np.float32(1.5)))
    proc = RepetitionPenaltyLogitsProcessor(1.5)
    for b in range(2):
        ref = proc(torch.tensor([ids[b]]), torch.tensor(logits[b:b + 1])).numpy()[0]
        np.testing.assert_allclose(ours[b], ref, rtol=1e-6)


def test_generate_with_repetition_penalty_matches_a_naive_loop(model):
    prompt, penalty, n = [3, 4, 5, 3], 1.8, 8
    seq = list(prompt)
    for _ in range(n):  # reference: full forward each step, penalty on every id in the sequence, argmax
        logits = ef_jax.logits(model, [seq])[0, -1].astype(np.float64)
        for t in set(seq):
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        seq.append(int(np.argmax(logits)))
    res = ef_jax.generate(model, [prompt], max_new_tokens=n, repetition_penalty=penalty)
    assert res.tokens[0] == seq[len(prompt):]
    assert res.tokens != ef_jax.generate(model, [prompt], max_new_tokens=n).tokens  # it changes something here


# ---- stats (items 4, 12) ----------------------------------------------------------------------------------------
def test_compile_time_reported_apart(model):
    first = ef_jax.generate(model, [[5] * 70], max_new_tokens=3).stats  # a prompt bucket no other test uses
    again = ef_jax.generate(model, [[6] * 70], max_new_tokens=3).stats
    assert first["compile_s"] > 0
    assert again["compile_s"] < 0.1 * first["compile_s"]
    assert 0 < first["prefill_s"] and 0 < again["prefill_s"]
    # the first decode step compiled: it is warm-up, and tokens/s counts only the step after it
    assert first["decoded_tokens"] == 1 and first["warmup_s"] > 0
    assert again["decoded_tokens"] == 2 and again["warmup_s"] == 0


def test_stats_have_one_shape_with_or_without_batch_size(model):
    off = ef_jax.OffloadConfig(slots_per_layer=4, policy="lru")
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]
    plain = ef_jax.generate(model, prompts, max_new_tokens=4, offload=off)
    batched = ef_jax.generate(model, prompts, max_new_tokens=4, offload=off, batch_size=2)
    assert set(plain.stats) == set(batched.stats)
    s = batched.stats
    # one expert cache serves both batches: its counters are the run's; the decode timings are per batch
    assert len(s["per_batch"]) == 2 and s["generated_tokens"] == sum(b["generated_tokens"] for b in s["per_batch"])
    assert s["hit_rate"] == pytest.approx(s["hits"] / (s["hits"] + s["misses"]))
    assert s["generated_tokens"] == 12 and s["prompt_tokens"] == 9 and s["batch_size"] == 2
    assert plain.stats["batches"] == [[0, 1, 2]] and s["batches"] == [[0, 1], [2]]


def test_real_bytes_beside_preset_bytes(model):
    res = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=4,
                          offload=ef_jax.OffloadConfig(slots_per_layer=4, policy="lru", timing="h100"))
    s, per_expert = res.stats, model.param_bytes()["per_expert"]
    from ef_jax.cache.timing import TIMING_PRESETS
    assert s["cache_loads"] > 0
    assert s["h2d_bytes_real"] == s["cache_loads"] * per_expert
    assert s["h2d_bytes"] == s["cache_loads"] * TIMING_PRESETS["h100"].expert_bytes != s["h2d_bytes_real"]
