"""Routing-prediction baselines: textbook cases and the real DeepSeek-V2-Lite trace."""
from pathlib import Path

import numpy as np
import pytest

from ef_jax.predict import FrequencyBaseline, PreviousTokenBaseline, TokenLookupBaseline, recall_at_k
from ef_jax.trace import load_trace, make_trace

TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "deepseek-v2-lite-puffin-dev.npz"


def _trace(experts, offsets, tokens):
    return make_trace(np.asarray(experts, np.uint8), np.asarray(offsets), np.arange(len(offsets) - 1, dtype=np.int32),
                      b"".join(t.encode() + b"\0" for t in tokens))


def test_recall_at_k_counts_overlap():
    scores = np.zeros((1, 1, 6), np.float32)
    scores[0, 0, [0, 1]] = 1
    assert recall_at_k(scores, np.array([[[1, 4]]])).tolist() == [0.5]


def test_lookup_is_exact_on_a_deterministic_trace_and_previous_token_on_repeats():
    # token "a" always routes to {0, 1}, "b" to {2, 3}; one prompt "a a b b".
    tr = _trace([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]]], [0, 4], ["a", "a", "b", "b"])
    lookup = TokenLookupBaseline(num_experts=4).fit(tr)
    assert recall_at_k(lookup.scores(tr), tr.experts).tolist() == [1.0]
    prev = PreviousTokenBaseline(num_experts=4).fit(tr).scores(tr)
    assert set(np.argsort(-prev[1, 0])[:2]) == {0, 1} and set(np.argsort(-prev[3, 0])[:2]) == {2, 3}


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/data/routing (not shipped with the package)")
def test_real_trace_baselines_beat_chance():
    full = load_trace(TRACE)
    cut = int(full.offsets[800])  # prompts 0..799 train, 800.. validate
    names = full.token_strings()
    train = make_trace(full.experts[:cut], full.offsets[:801], full.prompt_id[:800],
                       b"".join(t.encode() + b"\0" for t in names[:cut]))
    val = make_trace(full.experts[cut:], full.offsets[800:] - cut, full.prompt_id[800:],
                     b"".join(t.encode() + b"\0" for t in names[cut:]))
    r = {name: float(recall_at_k(cls(64).fit(train).scores(val), val.experts).mean())
         for name, cls in (("frequency", FrequencyBaseline), ("previous", PreviousTokenBaseline),
                           ("lookup", TokenLookupBaseline))}
    assert all(v > 6 / 64 for v in r.values()), r   # uniform guessing gives K/E ≈ 0.094
    assert r["lookup"] > r["frequency"], r
