"""Cache-aware routing (opt-in): δ = 0 changes nothing, δ > 0 trades bounded routing changes for fewer copies,
weights renormalised as the family does; bad arguments fail naming the argument; the benchmark routing override."""
import dataclasses

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.cache.routing import cache_aware, router_probs
from ef_jax.random_model import presets

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint("qwen3moe-norm"))


def test_zero_tolerance_is_exact_and_positive_moves_fewer_bytes(model):
    K = model.config.top_k
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=10)
    exact = ef_jax.generate(model, PROMPTS, max_new_tokens=10, offload=OffloadConfig(slots_per_layer=K + 1))
    zero = ef_jax.generate(model, PROMPTS, max_new_tokens=10, offload=OffloadConfig(
        slots_per_layer=K + 1, routing="cache-aware", routing_tolerance=0.0, check=True))
    assert zero.tokens == exact.tokens == ref.tokens
    assert zero.stats["routing_substitutions"] == 0 and zero.stats["h2d_bytes"] == exact.stats["h2d_bytes"]
    loose = ef_jax.generate(model, PROMPTS, max_new_tokens=10, offload=OffloadConfig(
        slots_per_layer=K + 1, routing="cache-aware", routing_tolerance=0.3, check=True))
    assert loose.stats["routing_substitutions"] > 0
    assert loose.stats["h2d_bytes"] < exact.stats["h2d_bytes"]
    assert loose.stats["hit_rate"] > exact.stats["hit_rate"]


def test_substitution_rule_and_renormalisation():
    cfg = presets()["tiny"]  # qwen3_moe, 8 experts, top-2, norm_topk_prob
    probs = np.array([[0.30, 0.25, 0.20, 0.10, 0.05, 0.04, 0.03, 0.03]], np.float32)
    logits = np.log(probs)
    experts = np.array([[0, 1]], np.int32)
    resident = np.zeros(8, bool)
    resident[[0, 2, 3]] = True
    new, w, changed = cache_aware(cfg, logits, experts, resident, tolerance=0.06)
    assert new.tolist() == [[0, 2]] and changed.tolist() == [True]  # 1 (0.25, absent) → 2 (0.20, resident)
    np.testing.assert_allclose(w, [[0.30 / 0.50, 0.20 / 0.50]], rtol=1e-5)  # renormalised like the router
    same, w2, changed2 = cache_aware(cfg, logits, experts, resident, tolerance=0.04)
    assert same.tolist() == [[0, 1]] and w2 is None and not changed2.any()  # 0.20 is not within 0.04 of 0.25
    unnorm = dataclasses.replace(cfg, norm_topk_prob=False, routed_scaling_factor=2.0)
    _, w3, _ = cache_aware(unnorm, logits, experts, resident, tolerance=0.06)
    np.testing.assert_allclose(w3, [[0.60, 0.40]], rtol=1e-5)  # raw probabilities × scaling


def test_group_limit_respected():
    cfg = dataclasses.replace(presets()["tiny"], topk_method="group_limited_greedy", n_group=4, topk_group=1)
    logits = np.log(np.array([[0.30, 0.25, 0.26, 0.01, 0.05, 0.05, 0.04, 0.04]], np.float32))
    p = router_probs(cfg, logits)
    assert p[0, 2:].sum() == 0  # only group 0 (experts 0, 1) survives
    resident = np.zeros(8, bool)
    resident[2] = True
    new, _, _ = cache_aware(cfg, logits, np.array([[0, 1]], np.int32), resident, tolerance=0.5)
    assert new.tolist() == [[0, 1]]  # expert 2 is outside the kept group: never substituted


@pytest.mark.parametrize("kw, match", [
    (dict(routing="fast"), "routing='fast' must be one of"),
    (dict(routing="cache-aware", routing_tolerance=-0.1), "routing_tolerance=-0.1 must be a number in"),
    (dict(routing="cache-aware", routing_tolerance=2.0), "routing_tolerance=2.0 must be a number in"),
    (dict(routing="cache-aware", routing_tolerance="0.1"), "routing_tolerance='0.1' must be a number in"),
    (dict(routing_tolerance=0.1), "routing_tolerance=0.1 only applies with routing='cache-aware'"),
    (dict(timing="tpu"), "timing='tpu'"),
])
def test_invalid_arguments_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(slots_per_layer=2, **kw)


def test_routing_override_replays_a_trace():
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.random_model import random_model
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    model = random_model(presets(num_layers=2)["tiny"])
    K = model.config.top_k
    trace = np.random.default_rng(0).permuted(np.tile(np.arange(8), (6, 2, 1)), axis=-1)[..., :K]  # [6, 2, K]
    fwd = Forward(model, OffloadConfig(slots_per_layer=K, check=True),
                  route_override=lambda step, j, experts: trace[step % len(trace), j][None].repeat(len(experts), 0))
    sample_rows(fwd, make_batch([[3]], 6), SamplingParams(), 0, set(), 6)
    got = np.concatenate(fwd.source.routing_log)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(trace, -1))
