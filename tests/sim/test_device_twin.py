"""The device step's policies against their host twin (ef_jax.sim.device_twin): on the routing and pre-gate scores
the device recorded, the numpy twin makes the same decisions — counters of every layer after every step (hits,
misses, prefetches issued / used / wasted, late misses, the horizon) and the final slot table."""
import jax
import numpy as np
import pytest

from ef_jax import OffloadConfig, PolicySpec

pytestmark = pytest.mark.slow

POLICIES = {"lru": "lru", "lfu": "lfu", "pregate": PolicySpec("pregate", distance=2),
            "expertflow": PolicySpec("expertflow", max_horizon=3, ratio=1.5), "predictive": PolicySpec("predictive", predictor="online")}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    import ef_jax
    return ef_jax.load(tiny_checkpoint("deepseek-qlora-grouped-yarn"))


@pytest.mark.parametrize("name", list(POLICIES))
def test_device_decisions_equal_the_host_twin(model, name):
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.device_twin import DeviceTwin
    cfg = model.config
    slots = cfg.top_k + 1
    prompts = [[7], [50]] if name != "predictive" else [[7]]  # predictive's table learns from single rows
    with Forward(model, OffloadConfig(slots_per_layer=slots, policy=POLICIES[name], step="device")) as fwd:
        fwd.source.record()
        sample_rows(fwd, make_batch(prompts, 12), SamplingParams(), 0, set(), 12)
        log = fwd.source.decisions_log
        policy, state = fwd.source.policy, jax.device_get(fwd.source.state)
    twin = DeviceTwin(policy, len(cfg.moe_layer_ids), cfg.num_experts, slots, cfg.top_k)
    # a mesh device's twin (its own columns) owning every expert is the one-device twin
    every = DeviceTwin(policy, len(cfg.moe_layer_ids), cfg.num_experts, slots, cfg.top_k, np.arange(cfg.num_experts))
    prefetched = 0
    for n, rec in enumerate(log):
        got = twin.step(rec["routed"], rec["real"], rec["scores"], rec["tokens"], rec["ratio"])
        np.testing.assert_array_equal(got, rec["counters"], err_msg=f"{name}: step {n}")
        np.testing.assert_array_equal(every.step(rec["routed"], rec["real"], rec["scores"], rec["tokens"],
                                                 rec["ratio"]), got, err_msg=f"{name}: step {n}, columns")
        prefetched = int(got[2].sum())
    np.testing.assert_array_equal(twin.eos, np.asarray(state.expert_of_slot))
    assert (prefetched > 0) == (name in ("pregate", "expertflow", "predictive"))
    if name == "expertflow":
        assert {int(r["counters"][-1, 0]) for r in log} != {1}, "the horizon never moved"


class _View:
    """The host cache's view of a recorded run, as HybridPredictor reads it: each step's union of real experts."""

    def __init__(self, log):
        self.log = log

    def routed(self, step, layer):
        if not 0 <= step < len(self.log) or layer < 0:
            return None
        rec = self.log[step]
        return np.unique(rec["routed"][layer][rec["real"]])


@pytest.mark.parametrize("point", ["attention", "moe"])
def test_hybrid_head_equals_the_twin_and_the_host_head(model, random_hybrid, point):
    """expertflow with a hybrid head on the device: the twin makes the same decisions from the scores the step
    recorded, and those scores are the host head's logits (HybridPredictor.scores) on the same hidden states
    (recorded at the head's point), token ids and routes — site −1 (the embeddings) plain pre-gating."""
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.policies.pregate import PregateScorer
    from ef_jax.sim.device_twin import DeviceTwin
    cfg = model.config
    L, H, slots = len(cfg.moe_layer_ids), 3, cfg.top_k + 1
    pred = random_hybrid(model, point)
    spec = PolicySpec("expertflow", max_horizon=H, ratio=1.5, predictor=pred)
    with Forward(model, OffloadConfig(slots_per_layer=slots, policy=spec, step="device")) as fwd:
        fwd.source.record()
        sample_rows(fwd, make_batch([[7], [50]], 12), SamplingParams(), 0, set(), 12)
        log = fwd.source.decisions_log
        policy, state = fwd.source.policy, jax.device_get(fwd.source.state)
    assert policy.head is not None and policy.head.point == point
    twin = DeviceTwin(policy, L, cfg.num_experts, slots, cfg.top_k)
    for n, rec in enumerate(log):
        np.testing.assert_array_equal(twin.step(rec["routed"], rec["real"], rec["scores"], rec["tokens"],
                                                rec["ratio"]), rec["counters"], err_msg=f"step {n}")
    np.testing.assert_array_equal(twin.eos, np.asarray(state.expert_of_slot))
    assert int(log[-1]["counters"][2].sum()) > 0  # it prefetched
    view, plain = _View(log), PregateScorer(pred.routers, pred.norms, pred.cfg.eps)
    embed, moved = np.asarray(model.params["embed"], np.float32), 0
    for n, rec in enumerate(log):
        context = {"step": n, "token_ids": rec["tokens"], "view": view}
        sites = [(-1, embed[rec["tokens"]])] + [(j, rec["hidden"][j]) for j in range(L - 1)]
        for i, (j, hidden) in enumerate(sites):
            targets = list(range(j + 1, min(j + 1 + H, L)))
            want = pred.scores(j, hidden, targets, context)
            for t in targets:
                np.testing.assert_allclose(rec["scores"][i, t], want[t], rtol=1e-4, atol=1e-4,
                                           err_msg=f"step {n}, site {j}, target {t}")
            moved += sum(not np.allclose(want[t], s) for t, s in plain.scores(j, hidden, targets, {}).items())
    assert moved >= len(log) * (L - 1)  # every headed pair of every step differs from plain pre-gating
