"""OffloadConfig(step="device") on an expert mesh (ef_jax.engine.sources.mesh_device_experts): every device's cache in
one shard_mapped step program. Greedy tokens equal one device's resident decoding; each device's hits and misses
equal its cache replayed by the simulator on the same routing (lru, nocache); lfu, pregate and expertflow decode the
resident tokens, the scoring ones prefetching on every device; stats per device and in total; the refusals.
Four CPU devices come from XLA_FLAGS set in tests/conftest.py.

Each run compiles its own step program, so the runs form a pairwise design over mesh {2, 4} × batch {1, 3} ×
budget {the least, ~50 %} across the models (on 4 devices the least budget is already half of each device's experts
for every model here)."""
import dataclasses

import jax
import pytest

import ef_jax
from ef_jax import OffloadConfig, PolicySpec
from ef_jax.cache.partition import ExpertPartition
from ef_jax.mesh import expert_mesh, on_mesh
from ef_jax.model import DEFAULT_MODEL_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices: XLA_FLAGS="
                                 "--xla_force_host_platform_device_count=4 before jax starts (tests/conftest.py)")]

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
TEXT_PROMPTS = ["To be, or not", "def main(", "In the beginning"]
NEW = 4
# model → (devices, batch, slots per device) runs
RUNS = {"default": [(4, 3, 4)],                       # E = 32, top-4: 8 experts per device, the least budget is half
        "random16": [(2, 1, 4), (2, 3, 2), (4, 1, 2)],  # E = 16, top-2: on 2 devices the least is 2 of 8, half 4
        "qwen2moe-norm-sparse-step": [(4, 3, 2)],       # E = 6 on 4 (2, 2, 1, 1: uneven), a shared expert, dense layers
        "deepseek-qlora-grouped-yarn": [(2, 1, 3)]}     # E = 8, top-3: 3 of 4; shared experts, grouped routing


def test_runs_cover_every_pair():
    assert {(n, b) for runs in RUNS.values() for n, b, _ in runs} == {(n, b) for n in (2, 4) for b in (1, 3)}


def _model(name, tiny_checkpoint):
    if name == "default":
        return ef_jax.load(DEFAULT_MODEL_DIR)
    if name == "random16":
        from ef_jax.random_model import presets, random_model
        return random_model(dataclasses.replace(presets(num_layers=2)["tiny"], num_experts=16), seed=16)
    return ef_jax.load(tiny_checkpoint(name))


@pytest.mark.parametrize("name", list(RUNS))
def test_tokens_equal_resident(name, tiny_checkpoint):
    model = _model(name, tiny_checkpoint)
    prompts = TEXT_PROMPTS if model.tokenizer is not None else PROMPTS
    refs = {}
    for n, b, slots in RUNS[name]:
        if b not in refs:
            refs[b] = ef_jax.generate(model, prompts[:b], max_new_tokens=NEW).tokens
        offload = OffloadConfig(slots_per_layer=slots, policy="lru", step="device", check=True)
        res = ef_jax.generate(on_mesh(model, expert_mesh(n)), prompts[:b], max_new_tokens=NEW, offload=offload)
        assert res.tokens == refs[b], (name, n, b, slots)
        s = res.stats
        assert s["devices"] == n and s["step"] == "device" and s["misses"] > 0
        per = s["per_device"]
        assert [p["experts"] for p in per] == list(ExpertPartition(model.config.num_experts, n).sizes)
        for key in ("hits", "misses", "h2d_bytes"):
            assert sum(p[key] for p in per) == s[key], key
        assert s["hits"] + s["misses"] == sum(s["layer_hits"]) + sum(s["layer_misses"])


@pytest.mark.parametrize("policy", ["lru", "nocache"])
def test_each_device_decides_as_the_simulator(policy):
    """Each device's hits and misses equal its own cache replayed on the routing the engine recorded (batch 2,
    2 of 8 slots per device), and lfu decodes the resident tokens."""
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.mesh import replay_mesh
    model = on_mesh(_model("random16", None), expert_mesh(2))
    with Forward(model, OffloadConfig(slots_per_layer=2, policy=policy, step="device", check=True)) as fwd:
        sample_rows(fwd, make_batch([[7], [50]], 10), SamplingParams(), 0, set(), 10)
        per = fwd.stats()["per_device"]
        sim = replay_mesh(fwd.source.routing_log, num_experts=16, num_devices=2, slots_per_layer=2, policy=policy)
    assert [(s.hits, s.misses) for s in sim] == [(p["hits"], p["misses"]) for p in per]
    assert sum(s.hits for s in sim) > 0 or policy == "nocache"


def test_lfu_keeps_the_tokens():
    model = _model("random16", None)
    ref = ef_jax.generate(model, PROMPTS[:1], max_new_tokens=NEW).tokens
    offload = OffloadConfig(slots_per_layer=2, policy="lfu", step="device")
    assert ef_jax.generate(on_mesh(model, expert_mesh(2)), PROMPTS[:1], max_new_tokens=NEW,
                           offload=offload).tokens == ref


@pytest.mark.parametrize("policy", ["pregate", PolicySpec("expertflow", max_horizon=2)], ids=["pregate", "expertflow"])
def test_scoring_policies_prefetch_on_every_device(policy):
    """Each device keeps its own columns of every later router's top-k and prefetches them into its own slots
    (batch 2, 2 of 8 slots per device): the resident tokens, and every device's prefetches land and are used."""
    model = _model("random16", None)
    ref = ef_jax.generate(model, PROMPTS[:2], max_new_tokens=NEW).tokens
    offload = OffloadConfig(slots_per_layer=2, policy=policy, step="device", check=True)
    res = ef_jax.generate(on_mesh(model, expert_mesh(2)), PROMPTS[:2], max_new_tokens=NEW, offload=offload)
    assert res.tokens == ref
    per = res.stats["per_device"]
    assert all(p["cache_prefetch_issued"] > 0 and p["cache_prefetch_used"] > 0 for p in per), per
    assert sum(p["cache_prefetch_issued"] for p in per) == res.stats["cache_prefetch_issued"]


def test_refusals(tiny_checkpoint):
    mm = on_mesh(ef_jax.load(tiny_checkpoint("olmoe")), expert_mesh(2))
    for offload, match in (
            (OffloadConfig(slots_per_layer=2, step="device", policy=PolicySpec("predictive", predictor="online")),
             "runs one cache per device"),
            (OffloadConfig(slots_per_layer=1, step="device"), "minimum is 2 slots per layer"),
            (OffloadConfig(expert_memory="auto", step="device"), "per device")):
        with pytest.raises(ValueError, match=match):
            ef_jax.generate(mm, [[1, 2]], max_new_tokens=1, offload=offload)
