"""The key/value-cached predictor step equals the full-window stepper within the window, for one row and many,
with and without trigram hashes, the previous route and the per-token table."""
import jax
import numpy as np
import pytest

from ef_jax.predict.incremental import IncrementalStepPredictor
from ef_jax.predict.path_predictor import PathPredictor, PredictorConfig, Vocab
from ef_jax.predict.runtime import PathStepPredictor, TrainedPredictor

L, E, K, T = 3, 8, 2, 6


def _trained(**kw) -> TrainedPredictor:
    cfg = PredictorConfig(vocab_size=40, num_layers=L, num_experts=E, top_k=K, d_model=16, num_heads=2, depth=2,
                          d_ff=32, window=T, dropout=0.0, **kw)
    width = (1 + 8,) if cfg.ngram_buckets else ()
    params = PathPredictor(cfg).init(jax.random.key(1), np.zeros((1, T) + width, np.int32), np.ones((1, T), np.int32),
                                     np.full((1, T, L, K), -1, np.int32))["params"]
    # an untrained head is nearly flat: scale it so differences in the logits are visible
    params = jax.tree_util.tree_map(lambda a: a * 3.0, params)
    return TrainedPredictor(cfg, params, Vocab([str(i) for i in range(30)]))


def _run(step, ids_by_step, routes):
    out = []
    for s, ids in enumerate(ids_by_step):
        out.append(step.predict(np.asarray(ids)))
        for l in range(L):
            step.observe(l, routes[s][l])
    return np.stack(out)


@pytest.mark.parametrize("kw", [{}, {"ngram_buckets": 13, "token_rank": 3}, {"prev_route": False}])
@pytest.mark.parametrize("batch", [1, 3])
def test_incremental_equals_full_window_within_the_window(kw, batch):
    tp = _trained(**kw)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 35, (T, batch))                        # T steps: the whole window, never truncated
    routes = [[rng.choice(E, K, replace=False).tolist() for _ in range(L)] for _ in range(T)]
    full = _run(PathStepPredictor(tp), ids, routes)
    inc = _run(IncrementalStepPredictor(tp), ids, routes)
    assert inc.shape == (T, batch, L, E)
    np.testing.assert_allclose(inc, full, rtol=1e-4, atol=1e-4)
    assert np.abs(full).max() > 0.1


def test_incremental_slides_past_the_window_and_resets():
    tp = _trained()
    step = IncrementalStepPredictor(tp)
    ids = np.random.default_rng(1).integers(0, 35, 3 * T)
    first = [step.predict(np.array([i])) for i in ids]
    assert all(np.isfinite(x).all() for x in first)
    step.reset(L, E)  # fresh history: the same tokens give the same first logits
    np.testing.assert_allclose(step.predict(np.array([ids[0]])), first[0], rtol=1e-6)
    step.predict(np.array([ids[0], ids[1]]))  # a new batch size starts fresh histories too
    with pytest.raises(ValueError, match="trained for 3 layers × 8 experts"):
        step.reset(4, E)
