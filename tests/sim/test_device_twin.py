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
