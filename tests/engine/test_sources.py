"""The expert-source contract (ef_jax.engine.sources.base): every source declares its Capabilities and reports
SourceStats with one key set; the three bugs of the undeclared seam (issue 25) stay fixed."""
import jax
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.cache.support import Unsupported
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.continuous import resident_experts
from ef_jax.engine.sources.base import ExpertSource, SourceStats
from ef_jax.evalpolicy import evaluate_policy

IDS = [5, 17, 33, 2, 70, 41, 9, 88]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint("qwen3moe-norm"))


@pytest.fixture(scope="module")
def mesh_model(tiny_checkpoint):
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets XLA_FLAGS)")
    return ef_jax.load(tiny_checkpoint("qwen3moe-norm"), mesh=ef_jax.expert_mesh(2))


def _modes(model):
    K = model.config.top_k
    return {"resident": None, "layer": OffloadConfig(slots_per_layer=K),
            "device": OffloadConfig(slots_per_layer=K, step="device")}


def test_every_source_declares_the_contract(model, mesh_model):
    for m, offload in [(model, o) for o in _modes(model).values()] + [(mesh_model, None),
                                                                       (mesh_model, OffloadConfig(slots_per_layer=2))]:
        with Forward(m, offload) as fwd:
            assert isinstance(fwd.source, ExpertSource)
            assert fwd.offloaded == (offload is not None) == fwd.source.capabilities.offloaded
            assert fwd.source.capabilities.host_compute is False
            assert fwd.source.capabilities.mesh == (m.mesh is not None)


def test_device_step_counts_as_offloaded(model):
    """Bug 1: Forward.offloaded was an isinstance over two of the three offloaded classes, so step="device" read as
    resident in the server's metrics, eval-policy's routing and cache-aware continuous batching."""
    with Forward(model, _modes(model)["device"]) as fwd:
        assert fwd.offloaded
        assert resident_experts(fwd) is not None  # continuous batching's cache-aware path sees the device cache
    r = evaluate_policy(model, IDS, _modes(model)["device"], seq_len=4, max_tokens=8)
    assert r.routing is not None and r.routing.shape[1:] == (model.config.num_moe_layers, model.config.top_k)
    assert r.stats["hits"] + r.stats["misses"] > 0


def test_route_override_is_refused_where_a_source_cannot_honour_it(model, mesh_model):
    """Bug 2: route_override was set as an attribute and silently ignored by the device and mesh sources."""
    same = lambda step, j, experts: experts  # noqa: E731
    with pytest.raises(Unsupported, match="step='device' routes inside the step program"):
        evaluate_policy(model, IDS, _modes(model)["device"], seq_len=4, route_override=same)
    with pytest.raises(Unsupported, match="not applied on a mesh of 2 devices"):
        evaluate_policy(mesh_model, IDS, OffloadConfig(slots_per_layer=2), seq_len=4, route_override=same)
    with pytest.raises(Unsupported, match="a resident run reads none"):
        evaluate_policy(model, IDS, None, seq_len=4, route_override=same)
    r = evaluate_policy(model, IDS, _modes(model)["layer"], seq_len=4, max_tokens=8, route_override=same)
    assert r.stats["hits"] + r.stats["misses"] > 0


def test_one_stats_key_set_for_every_source(model, mesh_model):
    """Bug 3: eval-policy on a mesh read cache_prefetch_issued, which the mesh's stats never wrote."""
    runs = {name: evaluate_policy(model, IDS, off, seq_len=4, max_tokens=8) for name, off in _modes(model).items()}
    runs["mesh"] = evaluate_policy(mesh_model, IDS, OffloadConfig(slots_per_layer=2), seq_len=4, max_tokens=8)
    for name, r in runs.items():
        assert SourceStats.KEYS <= r.stats.keys(), (name, SourceStats.KEYS - r.stats.keys())
    mesh = runs["mesh"].stats
    assert [d.keys() >= SourceStats.KEYS for d in mesh["per_device"]] == [True, True]
    assert mesh["cache_prefetch_issued"] == 0 and np.isnan(runs["mesh"].prefetch_precision)  # lru prefetches none
    assert mesh["hits"] == sum(d["hits"] for d in mesh["per_device"])
    assert runs["mesh"].routing is not None
