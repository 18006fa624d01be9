"""The engine's virtual clock (ef_jax.engine.transfer.clock.VirtualClock) reproduces the simulator: every count, and
stall to float precision (same timing model, same policy code)."""
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint("qwen3moe-norm"))


def test_virtual_clock_engine_matches_simulator(model):
    """The engine on the virtual clock and the simulator replaying the engine's routing agree on every count and
    on stall to float precision (same timing model, same policy code)."""
    from ef_jax.sim import TIMING_PRESETS, replay
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 40).tolist()
    for policy in ("lru", "nocache"):
        offload = OffloadConfig(slots_per_layer=3, policy=policy, timing="h100")
        from ef_jax.engine.forward.forward import Forward
        fwd = Forward(model, offload)
        from ef_jax.engine.loop.decode import teacher_forced
        teacher_forced(fwd, np.asarray([ids[:40]], np.int32))
        trace = np.sort(np.concatenate(fwd.source.routing_log), axis=-1)  # the engine requires a layer's experts sorted
        sim = replay(trace, slots_per_layer=3, policy=policy, timing="h100", num_experts=model.config.num_experts)
        s = fwd.stats()
        assert (s["hits"], s["misses"], s["h2d_bytes"]) == (sim.hits, sim.misses, sim.bytes_h2d)
        assert s["stall_s"] == pytest.approx(sim.stall_s, rel=1e-9) and s["stall_s"] > 0
        assert s["virtual_total_s"] == pytest.approx(sim.total_s, rel=1e-9)
        assert s["h2d_bytes"] == s["cache_loads"] * TIMING_PRESETS["h100"].expert_bytes
