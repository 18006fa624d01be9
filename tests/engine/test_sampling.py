"""Sampling filters against textbook versions computed with numpy."""
import jax
import numpy as np
import pytest

from ef_jax.engine.loop.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32)
    out = sample(logits, jax.random.key(0), SamplingParams())
    np.testing.assert_array_equal(np.asarray(out), logits.argmax(-1))


def test_top_k_and_top_p_support():
    """Every drawn token lies inside the textbook top-k ∩ nucleus set."""
    rs = np.random.RandomState(1)
    logits = rs.randn(2, 30).astype(np.float32) * 3
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.8)
    scaled = logits / 0.7
    allowed = []
    for row in scaled:
        order = np.argsort(-row)
        keep = set(order[:8])
        probs = np.exp(row[order[:8]] - row[order[0]])
        probs /= probs.sum()
        nucleus, mass = set(), 0.0
        for tok, pr in zip(order[:8], probs):
            if mass >= 0.8:
                break
            nucleus.add(tok)
            mass += pr
        allowed.append(keep & nucleus)
    for s in range(200):
        out = np.asarray(sample(logits, jax.random.key(s), p))
        assert all(int(t) in allowed[b] for b, t in enumerate(out))


def test_invalid_params():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(temperature=1.0, top_k=0)
