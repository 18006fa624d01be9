"""OffloadConfig(step="device") on an expert mesh (ef_jax.engine.sources.mesh_device_experts): every device's cache in
one shard_mapped step program. Greedy tokens equal one device's resident decoding for every mesh device policy; each
device's decisions equal its host twin's (ef_jax.sim.device_twin over its own columns) step by step, and lru's and
nocache's hits and misses the simulator's; stats per device and in total; the refusals. Four CPU devices come from
XLA_FLAGS set in tests/conftest.py.

Each run compiles its own step program, so the runs (RUNS and TWINS together) form a pairwise design over device
policy × mesh {2, 4} × batch {1, 3} × budget {the least, ~50 % of each device's experts}: every two factors meet in
every pair of values. The lru runs spread over the models (an uneven split, shared experts, dense layers, grouped
routing); the other policies run on random30, whose budgets differ on 4 devices too (8, 8, 7, 7 experts: the least
is 2, half 4) and whose split there is uneven (the last device's cache has a column it does not own)."""
import dataclasses

import jax
import numpy as np
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
POLICIES = {"nocache": "nocache", "lru": "lru", "lfu": "lfu", "pregate": "pregate",
            "expertflow": PolicySpec("expertflow", max_horizon=2, ratio=1.5)}  # a fixed ratio: the horizon moves
# model → (devices, batch, budget, policy) runs through ef_jax.generate (the program that runs unrecorded)
RUNS = {"default": [(4, 3, "min", "lru")],               # E = 32, top-4: 8 experts per device, the least is half
        "random16": [(2, 1, "half", "lru"), (2, 3, "min", "lru"), (4, 1, "min", "lru")],  # E = 16, top-2
        "qwen2moe-norm-sparse-step": [(4, 3, "min", "lru")],  # E = 6 on 4 (2, 2, 1, 1), a shared expert, dense layers
        "deepseek-qlora-grouped-yarn": [(2, 1, "min", "lru")],  # E = 8, top-3: 3 of 4; shared experts, grouped
        "random30": [(4, 3, "half", "lfu"), (4, 3, "min", "pregate"), (4, 3, "half", "expertflow"),
                     (2, 3, "half", "nocache"), (4, 1, "min", "nocache")]}
# (policy, devices, budget) on random30 at batch 1, recorded and replayed through each device's host twin
TWINS = [("lfu", 2, "min"), ("pregate", 2, "half"), ("expertflow", 2, "min"), ("expertflow", 4, "half")]


def test_runs_cover_every_pair():
    runs = [run for model_runs in RUNS.values() for run in model_runs] + [(n, 1, g, p) for p, n, g in TWINS]
    values = [(2, 4), (1, 3), ("min", "half"), tuple(POLICIES)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert {(r[a], r[b]) for r in runs} == {(u, v) for u in values[a] for v in values[b]}, (a, b)


def slots_for(model, devices: int, budget: str) -> int:
    """The least budget (one token's top-k may all land on one device) or about half of each device's experts."""
    E_max, K = ExpertPartition(model.config.num_experts, devices).max_size, model.config.top_k
    least = min(K, E_max)
    return least if budget == "min" else max(least, E_max // 2)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """name → model, and (name, batch) → its resident tokens; each built once for the module."""
    memo = {}

    def model(name):
        if name not in memo:
            memo[name] = _model(name, tiny_checkpoint)
        return memo[name]

    def resident(name, batch):
        if (name, batch) not in memo:
            m = model(name)
            memo[name, batch] = ef_jax.generate(m, prompts_for(m)[:batch], max_new_tokens=NEW).tokens
        return memo[name, batch]

    model.resident = resident
    return model


def prompts_for(model):
    return TEXT_PROMPTS if model.tokenizer is not None else PROMPTS


def _model(name, tiny_checkpoint):
    if name == "default":
        return ef_jax.load(DEFAULT_MODEL_DIR)
    if name.startswith("random"):  # random16, random30: the tiny preset with that many experts, top-2
        from ef_jax.random_model import presets, random_model
        E = int(name[len("random"):])
        return random_model(dataclasses.replace(presets(num_layers=2)["tiny"], num_experts=E), seed=E)
    return ef_jax.load(tiny_checkpoint(name))


@pytest.mark.parametrize("name", list(RUNS))
def test_tokens_equal_resident(name, models):
    model = models(name)
    for n, b, budget, policy in RUNS[name]:
        offload = OffloadConfig(slots_per_layer=slots_for(model, n, budget), policy=POLICIES[policy], step="device",
                                check=True)
        res = ef_jax.generate(on_mesh(model, expert_mesh(n)), prompts_for(model)[:b], max_new_tokens=NEW,
                              offload=offload)
        assert res.tokens == models.resident(name, b), (name, n, b, budget, policy)
        s = res.stats
        assert s["devices"] == n and s["step"] == "device" and s["misses"] > 0 and s["policy"] == policy
        per = s["per_device"]
        assert [p["experts"] for p in per] == list(ExpertPartition(model.config.num_experts, n).sizes)
        for key in ("hits", "misses", "h2d_bytes", "cache_prefetch_issued", "cache_prefetch_used"):
            assert sum(p[key] for p in per) == s[key], key
        assert s["hits"] + s["misses"] == sum(s["layer_hits"]) + sum(s["layer_misses"])
        assert (s["cache_prefetch_issued"] > 0) == (policy in ("pregate", "expertflow")), (policy, s)


@pytest.mark.parametrize("policy, devices, budget", TWINS, ids=[f"{p}-{n}" for p, n, _ in TWINS])
def test_each_device_decides_as_its_host_twin(models, policy, devices, budget):
    """Recorded (batch 1), each device's routing, scores and ratio replayed through the numpy twin of its policy
    over its own columns: its counters (hits, misses, prefetches issued and used, wasted, late, the horizon) and its
    slot table (the evictions) equal the twin's after every step; the tokens are the resident ones; the scoring
    policies prefetch on every device, and their prefetches are used."""
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.device_twin import DeviceTwin
    model, cfg = models("random30"), models("random30").config
    slots = slots_for(model, devices, budget)
    offload = OffloadConfig(slots_per_layer=slots, policy=POLICIES[policy], step="device", check=True)
    with Forward(on_mesh(model, expert_mesh(devices)), offload) as fwd:
        fwd.source.record()
        tokens, _ = sample_rows(fwd, make_batch(PROMPTS[:1], NEW), SamplingParams(), 0, set(), NEW)
        src, s = fwd.source, fwd.stats()
        log, columns, per = src.decisions_log, src.columns(), s["per_device"]
    assert tokens == models.resident("random30", 1)
    assert len(log) == NEW and (columns[-1] < 0).any() == (devices == 4)  # 4: the last device's foreign column
    for d in range(devices):
        twin = DeviceTwin(src.policy, len(cfg.moe_layer_ids), src.layout.experts, slots, cfg.top_k, columns[d])
        for n, rec in enumerate(log):
            scores = None if rec["scores"] is None else rec["scores"][d]
            got = twin.step(rec["routed"], rec["real"], scores, rec["tokens"], rec["ratio"][d])
            np.testing.assert_array_equal(got, rec["counters"][d], err_msg=f"{policy}: device {d}, step {n}")
            np.testing.assert_array_equal(twin.eos, rec["expert_of_slot"][d], err_msg=f"device {d}, step {n}")
    if policy in ("pregate", "expertflow"):  # (on 4 devices, 5 steps of one token leave a device's maybe unused)
        issued, used = ([p[k] for p in per] for k in ("cache_prefetch_issued", "cache_prefetch_used"))
        assert min(issued) > 0 and (min(used) if devices == 2 else sum(used)) > 0, (issued, used)
    if policy == "expertflow":
        assert {int(r["counters"][d, -1, 0]) for r in log for d in range(devices)} != {1}, "the horizon never moved"
    check_horizon_stats(s, log, policy)


def check_horizon_stats(s, log, policy):
    """The one-device source's horizon telemetry, per device: each device's horizon after every step (and their
    mean) in device_steps, mean_horizon over steps and devices (each device's in per_device; NaN when nothing is
    scored), and copy_layer_ratio, the one ratio every device's expertflow is sent."""
    horizons = np.array([r["counters"][:, -1, 0] for r in log])                    # [steps, n]
    assert s["device_steps"]["horizon_per_device"] == horizons.tolist()
    assert s["device_steps"]["horizon"] == horizons.mean(1).tolist()
    if policy in ("pregate", "expertflow"):
        assert s["mean_horizon"] == pytest.approx(horizons.mean())
        assert [p["mean_horizon"] for p in s["per_device"]] == pytest.approx(horizons.mean(0).tolist())
    else:
        assert np.isnan(s["mean_horizon"]) and all(np.isnan(p["mean_horizon"]) for p in s["per_device"])
    assert s.get("copy_layer_ratio") == (1.5 if policy == "expertflow" else None)  # POLICIES' fixed ratio


@pytest.mark.parametrize("policy", ["lru", "nocache"])
def test_each_device_decides_as_the_simulator(policy, models):
    """Each device's hits and misses equal its own cache replayed by the simulator (ef_jax.cache.ExpertCache, not
    the twin) on the routing the engine recorded (batch 2, 2 of 8 slots per device)."""
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.mesh import replay_mesh
    model = on_mesh(models("random16"), expert_mesh(2))
    with Forward(model, OffloadConfig(slots_per_layer=2, policy=policy, step="device", check=True)) as fwd:
        sample_rows(fwd, make_batch([[7], [50]], 10), SamplingParams(), 0, set(), 10)
        per = fwd.stats()["per_device"]
        sim = replay_mesh(fwd.source.routing_log, num_experts=16, num_devices=2, slots_per_layer=2, policy=policy)
    assert [(s.hits, s.misses) for s in sim] == [(p["hits"], p["misses"]) for p in per]
    assert sum(s.hits for s in sim) > 0 or policy == "nocache"


def test_refusals(tiny_checkpoint):
    mm = on_mesh(ef_jax.load(tiny_checkpoint("olmoe")), expert_mesh(2))
    for offload, match in (
            (OffloadConfig(slots_per_layer=2, step="device", policy=PolicySpec("predictive", predictor="online")),
             "runs one cache per device"),
            (OffloadConfig(slots_per_layer=1, step="device"), "minimum is 2 slots per layer"),
            (OffloadConfig(expert_memory="auto", step="device"), "per device")):
        with pytest.raises(ValueError, match=match):
            ef_jax.generate(mm, [[1, 2]], max_new_tokens=1, offload=offload)
