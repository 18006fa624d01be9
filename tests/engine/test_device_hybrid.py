"""device_hybrid: the hybrid head inside the device step computes what the host head (ef_jax.hybrid.predictor.
HybridPredictor.scores) computes, site by site, on random non-zero parameters — the pairs' layout on the device,
the distances beyond the head (plain pre-gating), site −1 (no head) — and what takes a head on the device."""
import numpy as np
import pytest

from ef_jax.engine.programs import device_hybrid as dh
from ef_jax.hybrid import model as hm
from ef_jax.hybrid.predictor import HybridPredictor
from ef_jax.policies.pregate import PregateScorer

L, E, K, D, V, C, H = 4, 8, 2, 16, 50, 4, 3  # H: the device's H_max; the head reaches 2 < H layers ahead


class View:
    """The host cache's view, as HybridPredictor reads it: the experts routed at (step, layer)."""

    def __init__(self, routes: dict):
        self.routes = routes

    def routed(self, step, layer):
        return self.routes.get((step, layer))


def random_head(point="attention", max_distance=2, seed=0):
    rng = np.random.default_rng(seed)
    cfg = hm.HybridConfig(num_layers=L, num_experts=E, top_k=K, hidden=D, vocab=V, max_distance=max_distance,
                          token_dim=C, eps=1e-5, point=point)
    params = {k: rng.normal(0, 0.5, np.shape(v)).astype(np.float32) for k, v in hm.init_params(cfg).items()}
    routers = rng.normal(0, 1, (L, D, E)).astype(np.float32)
    norms = (1 + rng.normal(0, 0.2, (L, D))).astype(np.float32)
    return HybridPredictor(cfg, params, list(routers), list(norms))


def test_device_head_equals_the_host_head_at_every_site():
    pred = random_head()
    spec = dh.head_spec(pred, H)
    assert spec == dh.HeadSpec(distance=2, point="attention")
    scorer, head = dh.head_args(pred, spec, L, E, D)
    assert head["wh"].shape == (sum(min(2, L - 1 - j) for j in range(L)), D, E)
    rng = np.random.default_rng(1)
    B = 3
    hidden = rng.normal(0, 2, (B, 2, D)).astype(np.float32)            # [B, T, D]: the newest position counts
    tokens = rng.integers(0, V, B).astype(np.int32)
    prev = rng.random((L, E)) < 0.3                                       # the previous step's routes
    plain = PregateScorer(pred.routers, pred.norms, pred.cfg.eps)
    changed = 0
    for j in range(-1, L - 1):
        cur = rng.random(E) < 0.3
        layers = range(j + 1, min(j + 1 + H, L))
        got = np.asarray(dh.head_scores(spec, scorer, head, hidden, j, layers, cur, prev, tokens))
        assert got.shape == (len(layers), B, E)
        view = View({(1, j): np.flatnonzero(cur), **{(0, t): np.flatnonzero(prev[t]) for t in range(L)}})
        want = pred.scores(j, hidden[:, -1], list(layers), {"step": 1, "token_ids": tokens, "view": view})
        pre = plain.scores(j, hidden[:, -1], list(layers), {})
        for t in layers:
            np.testing.assert_allclose(got[t - j - 1], want[t], rtol=1e-5, atol=1e-4, err_msg=f"site {j}, target {t}")
            headed = j >= 0 and t - j <= spec.distance
            assert np.allclose(want[t], pre[t]) != headed, (j, t)  # the head moves exactly the pairs it has
            changed += headed
    assert changed == sum(min(2, L - 1 - j) for j in range(L - 1))


def test_head_args_refuse_another_model_shape():
    pred = random_head()
    with pytest.raises(ValueError, match="trained for 4 MoE layers × 8 experts, D=16; this model has 4 × 6"):
        dh.head_args(pred, dh.head_spec(pred, H), L, 6, D)
    with pytest.raises(ValueError, match="point='mid' must be one of"):
        dh.HeadSpec(distance=1, point="mid")


def test_device_policy_takes_a_hybrid_head_and_refuses_other_predictors():
    from ef_jax import PolicySpec
    from ef_jax.engine.sources.calibrate import device_policy_for
    pred = random_head(point="moe", max_distance=3)
    policy, _ = device_policy_for(PolicySpec("expertflow", predictor=pred, max_horizon=2))
    assert policy.head == dh.HeadSpec(distance=2, point="moe") and policy.kind == "expertflow"
    assert device_policy_for("expertflow")[0].head is None  # no head: the plain policy, compiled as before
    with pytest.raises(ValueError, match=r"\['predictor'\] have no device version for a PregateScorer"):
        device_policy_for(PolicySpec("expertflow", predictor=PregateScorer(pred.routers, pred.norms, 1e-5)))
