"""Several devices (ef_jax.mesh): greedy tokens on a mesh of 2 and 4 devices equal one device, resident and offloaded;
each device's budget, per-device telemetry, the simulator's mesh replay, and the refusals. Four CPU devices come from
XLA_FLAGS set in tests/conftest.py."""
import dataclasses

import jax
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig, PolicySpec
from ef_jax.cache.partition import ExpertPartition
from ef_jax.mesh import EXPERT_AXIS, expert_mesh, on_mesh
from ef_jax.model import DEFAULT_MODEL_DIR

pytestmark = [pytest.mark.slow,  # among the longest modules: scheduled first (tests/conftest.py)
              pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices: XLA_FLAGS="
                                 "--xla_force_host_platform_device_count=4 before jax starts (tests/conftest.py)")]

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
TEXT_PROMPTS = ["To be, or not", "def main(", "In the beginning"]
# E = 4 (one expert per device on 4), 6 (uneven on 4: 2, 2, 1, 1), 8 with grouped routing; the shipped model E = 32
FAMILIES = ["mixtral-top2", "qwen2moe-norm-sparse-step", "qwen3moe-norm", "olmoe", "deepseek-qlora-grouped-yarn",
            "default"]
NEW = 6  # as tests/test_offload_engine.py: the one-device references reuse its programs from the run's compile cache


def test_partition_splits_evenly_and_unevenly():
    p = ExpertPartition(10, 4)
    assert p.sizes == (3, 3, 2, 2) and p.starts == (0, 3, 6, 8) and p.max_size == 3
    assert p.owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert p.local.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert [s.tolist() for s in p.split(np.array([1, 4, 5, 9]))] == [[1], [1, 2], [], [1]]
    assert p.to_global(1, [1, 2]).tolist() == [4, 5]
    assert ExpertPartition(3, 2).sizes == (2, 1)
    with pytest.raises(ValueError, match="at most 3 devices"):
        ExpertPartition(3, 4)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tiny_checkpoint):
    if request.param == "default":
        return ef_jax.load(DEFAULT_MODEL_DIR)
    return ef_jax.load(tiny_checkpoint(request.param))


def _prompts(model):
    return TEXT_PROMPTS if model.tokenizer is not None else PROMPTS


def _minimum(model, n: int) -> int:
    """The least slots per device: one token's top-k may all belong to one device."""
    return min(model.config.top_k, ExpertPartition(model.config.num_experts, n).max_size)


@pytest.fixture(scope="module")
def reference(model):
    """One device, all resident: greedy tokens per batch size (1 or 3), computed when a run first needs them."""
    prompts, runs = _prompts(model), {}

    def get(b: int) -> list:
        if b not in runs:
            runs[b] = ef_jax.generate(model, prompts[:b], max_new_tokens=NEW).tokens
        return runs[b]
    return get


# family → its (devices, offloaded, batch) runs. Each run compiles its own programs (seconds to tens of seconds on a
# CI CPU), so each family runs two: one resident, one offloaded, one at batch 1 and one at batch 3 (rows of different
# lengths, padding masked); together the families run all 8 combinations. Every family runs offloaded on a mesh,
# qwen2moe (E = 6: 2, 2, 1, 1) both ways on 4 devices (uneven split), the shipped model (E = 32) offloaded on 4 at
# batch 3 and resident on 2 at batch 1.
RUNS = {"mixtral-top2": [(4, True, 3), (2, False, 1)],
        "qwen2moe-norm-sparse-step": [(4, True, 3), (4, False, 1)],
        "qwen3moe-norm": [(2, True, 1), (4, False, 3)],
        "olmoe": [(2, True, 3), (4, False, 1)],
        "deepseek-qlora-grouped-yarn": [(4, True, 1), (2, False, 3)],
        "default": [(4, True, 3), (2, False, 1)]}


def test_runs_cover_every_combination():
    assert {r for runs in RUNS.values() for r in runs} == {(n, o, b) for n in (2, 4) for o in (False, True)
                                                           for b in (1, 3)}
    assert set(RUNS) == set(FAMILIES)
    for runs in RUNS.values():
        assert {o for _, o, _ in runs} == {False, True} and {b for _, _, b in runs} == {1, 3}


def test_mesh_tokens_equal_one_device(request, model, reference):
    family = request.node.callspec.params["model"]
    meshes = {}
    for n, offloaded, b in RUNS[family]:
        mesh = meshes.setdefault(n, on_mesh(model, expert_mesh(n)))
        offload = OffloadConfig(slots_per_layer=_minimum(model, n), policy="lru", check=True) if offloaded else None
        res = ef_jax.generate(mesh, _prompts(model)[:b], max_new_tokens=NEW, offload=offload)
        assert res.tokens == reference(b), (n, offloaded, b)
        assert res.stats.get("devices") == n
        if not offloaded:
            continue
        per = res.stats["per_device"]
        assert len(per) == n and sum(p["hits"] + p["misses"] for p in per) == res.stats["hits"] + res.stats["misses"]
        assert sum(p["h2d_bytes"] for p in per) == res.stats["h2d_bytes"] > 0
        assert [p["experts"] for p in per] == list(ExpertPartition(model.config.num_experts, n).sizes)


def test_uneven_splits_of_a_random_model():
    """E = 10 on 4 devices (3, 3, 2, 2): tokens equal one device, resident and offloaded; E = 3 on 2 (2, 1),
    offloaded (a resident uneven split is also qwen2moe's on 4 devices, in the family test)."""
    from ef_jax.random_model import presets, random_model
    for E, n, resident in ((10, 4, True), (3, 2, False)):
        cfg = dataclasses.replace(presets(num_layers=2)["tiny"], num_experts=E)
        model = random_model(cfg, seed=E)
        ref = ef_jax.generate(model, PROMPTS, max_new_tokens=NEW).tokens
        mm = on_mesh(model, expert_mesh(n))
        offloads = [OffloadConfig(slots_per_layer=_minimum(model, n), policy="lru", check=True)]
        for offload in ([None] if resident else []) + offloads:
            assert ef_jax.generate(mm, PROMPTS, max_new_tokens=NEW, offload=offload).tokens == ref, (E, n, offload)


def test_no_device_holds_more_than_its_budget(tiny_checkpoint):
    """expert_memory is per device: each device's slot pool (counted from its arrays) fits in it."""
    from ef_jax.engine.forward.forward import Forward
    model = on_mesh(ef_jax.load(tiny_checkpoint("qwen2moe-norm-sparse-step")), expert_mesh(4))
    cfg, per = model.config, model.param_bytes()["per_expert"]
    budget = per * cfg.num_moe_layers * 3 - 1  # one byte short of 3 slots per layer: 2, the minimum (E_max = 2)
    with Forward(model, OffloadConfig(expert_memory=budget)) as fwd:
        src = fwd.source
        assert src.slots == 2
        for copier in src.copiers:
            held = sum(a.nbytes for a in jax.tree.leaves(copier.pool))
            assert held <= budget
            assert {d.id for a in jax.tree.leaves(copier.pool) for d in a.devices()} == {copier.store.device.id}
        assert all(p.expert_bytes_resident <= budget for p in src.stats().per_device)
    with pytest.raises(ValueError, match=r"minimum is 2 slots per layer"):
        Forward(model, OffloadConfig(expert_memory=per * cfg.num_moe_layers))


@pytest.mark.parametrize("policy", ["lru", "lfu", "nocache"])
def test_simulator_mesh_replay_agrees_with_engine(tiny_checkpoint, policy):
    """Each device's hits and misses equal its cache replayed on the routing the engine recorded (batch 2)."""
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.mesh import replay_mesh
    model = on_mesh(ef_jax.load(tiny_checkpoint("qwen3moe-norm")), expert_mesh(4))
    cfg = model.config
    with Forward(model, OffloadConfig(slots_per_layer=2, policy=policy)) as fwd:
        sample_rows(fwd, make_batch([[7], [50]], 10), SamplingParams(), 0, set(), 10)
        per = fwd.stats()["per_device"]
        sim = replay_mesh(fwd.source.routing_log, num_experts=cfg.num_experts, num_devices=4, slots_per_layer=2,
                          policy=policy)
    assert [(s.hits, s.misses) for s in sim] == [(p["hits"], p["misses"]) for p in per]
    assert sum(s.hits for s in sim) > 0 or policy == "nocache"


def test_mesh_refusals(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("olmoe"))
    with pytest.raises(ValueError, match="one axis named 'expert'"):
        on_mesh(model, jax.make_mesh((2,), ("data",)))
    with pytest.raises(ValueError, match="at most 8 devices"):
        ExpertPartition(model.config.num_experts, 9)
    with pytest.raises(ValueError, match="sees 4 cpu devices"):
        expert_mesh(64)
    mm = on_mesh(model, expert_mesh(2))
    for offload, match in ((OffloadConfig(slots_per_layer=2, policy="expertflow"), "runs on one device"),
                           (OffloadConfig(slots_per_layer=2, step="device",
                                          policy=PolicySpec("predictive", predictor="online")),
                            "runs one cache per device"),
                           (OffloadConfig(expert_memory="auto"), "per device"),
                           (OffloadConfig(slots_per_layer=2, routing="cache-aware"), "routing='exact'")):
        with pytest.raises(ValueError, match=match):
            ef_jax.generate(mm, [[1, 2]], max_new_tokens=1, offload=offload)


def test_load_with_mesh_replicates_the_weights(tiny_checkpoint):
    """load(mesh=) with a mesh from jax.make_mesh (explicit axis types in this jax), as README shows."""
    mesh = jax.make_mesh((2,), (EXPERT_AXIS,))
    model = ef_jax.load(tiny_checkpoint("olmoe"), mesh=mesh)
    assert model.mesh is mesh
    leaf = jax.tree.leaves(model.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.devices()) == 2
    one = ef_jax.generate(ef_jax.load(tiny_checkpoint("olmoe")), PROMPTS[:1], max_new_tokens=NEW).tokens
    assert ef_jax.generate(model, PROMPTS[:1], max_new_tokens=NEW).tokens == one


def test_quantized_experts_on_a_mesh(tiny_checkpoint):
    """int8 experts split over 2 devices, offloaded, decode what int8 experts decode on one device."""
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"), expert_dtype="int8", group_size=8)
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=NEW).tokens
    offload = OffloadConfig(slots_per_layer=2, policy="lru", check=True)
    assert ef_jax.generate(on_mesh(model, expert_mesh(2)), PROMPTS, max_new_tokens=NEW, offload=offload).tokens == ref


def test_pallas_kernel_on_a_mesh(tiny_checkpoint):
    """Each device's expert FFN through kernels_pallas (interpret mode) inside the shard_map, resident and
    offloaded, decodes the one-device XLA path's tokens."""
    path = tiny_checkpoint("qwen3moe-norm")
    ref = ef_jax.generate(ef_jax.load(path), PROMPTS[:2], max_new_tokens=3).tokens
    model = ef_jax.load(path, mesh=expert_mesh(2), expert_kernel="pallas-interpret")
    assert model.expert_kernel == "pallas-interpret"
    assert ef_jax.generate(model, PROMPTS[:2], max_new_tokens=3).tokens == ref
    offload = OffloadConfig(slots_per_layer=2, policy="lru")
    assert ef_jax.generate(model, PROMPTS[:2], max_new_tokens=3, offload=offload).tokens == ref
