"""OffloadConfig(step="device"): the whole token step in one program, the expert cache on the device.

Tokens identical to resident decoding for every tiny family; LRU hits and misses equal to the simulator's on the
same routing; one host sync per token; the batch whose union of experts exceeds the slots (in-program passes);
quantized (int8) experts; a tapped step; the refusals. Kept small (4 new tokens, compiled programs reused through a
module-scoped memo) because the whole suite runs on a 2-core CI machine.

Every compiled step costs seconds on CPU, so each family runs one configuration, and the five families together
cover every pair of factor values (a pairwise design over budget {minimum, ~50 %} × batch {1, 3} × device policy
{lru, lfu, pregate, predictive, expertflow}); test_every_prefetching_policy adds each policy at the budget and
batch the families leave out, and nocache at the cheapest point. record_timeline: one trace event per step with its
counters, no extra sync.
"""
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig, PolicySpec

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
FAMILIES = ["mixtral-top2", "qwen2moe-norm-sparse-step", "qwen3moe-norm", "olmoe", "deepseek-qlora-grouped-yarn"]
NEW = 4
# family → (budget, batch, policy): every pair of (budget, batch, hints) values appears; olmoe runs with int8
# experts (quantized rows copied as bytes and unpacked into the slot), its reference resident int8 decoding
QUANT = {"olmoe": "int8"}
CONFIGS = {"mixtral-top2": ("min", 1, "lru"), "qwen2moe-norm-sparse-step": ("half", 1, PolicySpec("predictive", predictor="online")),
           "qwen3moe-norm": ("half", 3, "lfu"), "olmoe": ("min", 1, "pregate"),
           "deepseek-qlora-grouped-yarn": ("min", 3, "expertflow")}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint):
    """(family, budget, batch, policy, check) → GenerateResult, plus the resident reference per (family, batch);
    each computed once for the module."""
    models, memo = {}, {}

    def model(family):
        if family not in models:
            models[family] = ef_jax.load(tiny_checkpoint(family), expert_dtype=QUANT.get(family))
        return models[family]

    def get(family, budget=None, batch=1, policy="lru", check=True):
        key = (family, budget, batch, policy, check)
        if key not in memo:
            m = model(family)
            cfg = m.config
            offload = None
            if budget is not None:
                slots = cfg.top_k if budget == "min" else max(cfg.top_k, cfg.num_experts // 2)
                offload = OffloadConfig(slots_per_layer=slots, policy=policy,
                                        step="device", check=check)
            memo[key] = ef_jax.generate(m, PROMPTS[:batch], max_new_tokens=NEW, offload=offload)
        return memo[key]

    get.model = model
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_resident(runs, family):
    """check=True: after every step the device tables are consistent and every slot holds its expert's bytes."""
    budget, batch, policy = CONFIGS[family]
    res = runs(family, budget, batch, policy)
    assert res.tokens == runs(family, batch=batch).tokens, (family, budget, batch, policy)
    s = res.stats
    assert s["step"] == "device" and s["hits"] + s["misses"] > 0
    assert s["h2d_bytes"] == s["cache_loads"] * runs.model(family).param_bytes()["per_expert"]
    assert s["bytes_per_expert"] == runs.model(family).param_bytes()["per_expert"]  # quantized bytes for int8
    check_prefetch_counters(s, policy)


PREFETCHING = ("pregate", "predictive", "expertflow")


def check_prefetch_counters(s, policy):
    name = getattr(policy, "name", policy)
    assert (s["cache_prefetch_issued"] > 0) == (name in PREFETCHING), s["cache_prefetch_issued"]
    assert s["cache_prefetch_used"] + s["cache_prefetch_wasted"] <= s["cache_prefetch_issued"]
    per = s["device_steps"]  # per-step telemetry sums to the totals
    assert sum(per["demand_misses"]) == s["misses"] and sum(per["prefetch_issued"]) == s["cache_prefetch_issued"]
    assert sum(per["h2d_bytes"]) == s["h2d_bytes"]


@pytest.mark.parametrize("budget, batch, policy", [("min", 3, "lfu"), ("half", 3, "pregate"),
                                                   ("min", 3, PolicySpec("predictive", predictor="online")),
                                                   ("half", 1, "expertflow"), ("min", 1, "nocache")])
def test_every_prefetching_policy(runs, budget, batch, policy):
    """The pairs the families leave out, on one family (one model, a few compiled shapes); and nocache (every slot
    flushed after each layer), which no family runs, at the cheapest point: batch 1, the least budget."""
    family = "qwen3moe-norm"
    res = runs(family, budget, batch, policy)
    assert res.tokens == runs(family, batch=batch).tokens, (budget, batch, policy)
    check_prefetch_counters(res.stats, policy)


@pytest.fixture(scope="module")
def hybrid_spec(runs, random_hybrid):
    """expertflow with a hybrid head (random non-zero parameters, at the layer-output point) on qwen3moe-norm: one
    spec object, so the module's memo runs it once per batch."""
    return PolicySpec("expertflow", predictor=random_hybrid(runs.model("qwen3moe-norm"), "moe"))


@pytest.mark.parametrize("batch", [1, 3])
def test_hybrid_head_inside_the_step(runs, hybrid_spec, batch):
    """The head's logits pick the prefetches inside the step; tokens stay those of resident decoding (minimum
    budget, so most experts are copied), with no host sync beyond the sampled token."""
    res = runs("qwen3moe-norm", "min", batch, hybrid_spec, check=False)
    assert res.tokens == runs("qwen3moe-norm", batch=batch).tokens, batch
    s = res.stats
    check_prefetch_counters(s, "expertflow")
    assert s["host_syncs_per_step"] == 1.0 and s["readback_waits"] == 0, s["sync_points"]


def test_timeline_one_event_per_step(runs, tmp_path):
    """record_timeline: one compute event per step (the prefill included) whose args are that step's
    stats()["device_steps"] values, counter graphs of misses, prefetches and the horizon; the same tokens and host
    syncs per step as the run without it (the counters come back with the sampled token: no sync of their own).
    The configuration of test_one_host_sync_per_token (expertflow, batch 3): its programs, already compiled."""
    import json
    family = "deepseek-qlora-grouped-yarn"
    budget, batch, policy = CONFIGS[family]
    plain = runs(family, budget, batch, policy, check=False)
    model = runs.model(family)
    path = tmp_path / "steps.json"
    offload = OffloadConfig(slots_per_layer=model.config.top_k, policy=policy, step="device",
                            record_timeline=str(path))
    res = ef_jax.generate(model, PROMPTS[:batch], max_new_tokens=NEW, offload=offload)
    s = res.stats
    assert res.tokens == plain.tokens
    assert s["sync_points"] == plain.stats["sync_points"] and s["host_syncs_per_step"] == 1.0, s["sync_points"]
    events = json.load(open(path))["traceEvents"]
    steps, per = [e for e in events if e["ph"] == "X"], s["device_steps"]
    assert len(steps) == s["decoded_tokens"] // batch + 1 == len(per["demand_misses"])
    for n, e in enumerate(steps):
        assert e["name"] == f"step {n}" and e["tid"] == 0 and e["dur"] > 0, e
        assert {k: e["args"][k] for k in per} == {k: v[n] for k, v in per.items()}, n
    assert [e["args"]["tokens"] for e in steps] == [sum(map(len, PROMPTS[:batch]))] + [batch] * (len(steps) - 1)
    assert all(abs(a["ts"] + a["dur"] - b["ts"]) < 1e-3 for a, b in zip(steps, steps[1:]))  # end to end, in order
    graph = lambda name, key: [e["args"][key] for e in events if e["ph"] == "C" and e["name"] == name]  # noqa: E731
    assert graph("misses", "demand") == per["demand_misses"] and graph("prefetches", "issued") == per["prefetch_issued"]
    assert graph("horizon", "layers") == per["horizon"] and sum(per["prefetch_issued"]) > 0


@pytest.mark.parametrize("family", ["olmoe", "deepseek-qlora-grouped-yarn"])
def test_one_host_sync_per_token(runs, family):
    """Without check (whose slot verification reads the device), the sampled token is the step's only sync."""
    budget, batch, policy = CONFIGS[family]
    res = runs(family, budget, batch, policy, check=False)
    s = res.stats
    steps = s["decoded_tokens"] // batch + 1  # decode steps + the prefill
    assert s["sync_points"] == {"sample": steps} and s["host_syncs_per_step"] == 1.0, s["sync_points"]
    assert s["step_readbacks"] == steps and s["readback_waits"] == 0  # counters and routing came back unwaited
    assert res.tokens == runs(family, batch=batch).tokens


def test_batch_union_beyond_the_slots_takes_extra_passes(runs):
    """Batch 3 at the minimum budget: some layer needs more experts than its slots, so it runs in passes inside
    the same program; tokens stay those of resident decoding."""
    family = "deepseek-qlora-grouped-yarn"
    res = runs(family, *CONFIGS[family])
    assert res.stats["extra_passes"] > 0
    assert res.tokens == runs(family, batch=3).tokens


def test_lru_counters_equal_the_simulator(runs):
    """The device's LRU hits and misses equal the trace simulator's on the same routing (one-token prompts: the
    prefill is a step of one token per row, as the simulator's steps are; one compiled program serves all steps)."""
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.sim.replay import replay
    model = runs.model("deepseek-qlora-grouped-yarn")
    cfg = model.config
    prompts, slots = [[7], [50]], min(2 * cfg.top_k, cfg.num_experts)
    with Forward(model, OffloadConfig(slots_per_layer=slots, policy="lru", step="device")) as fwd:
        sample_rows(fwd, make_batch(prompts, 10), SamplingParams(), 0, set(), 10)
        s = fwd.stats()
        trace = np.concatenate(fwd.source.routing_log)              # [steps · B, L_moe, K]
    assert trace.shape[0] == 10 * len(prompts)
    sim = replay(trace, slots_per_layer=slots, policy="lru", batch_size=len(prompts), num_experts=cfg.num_experts)
    assert (s["hits"], s["misses"]) == (sim.hits, sim.misses)
    assert s["layer_hits"] == sim_layer(trace, slots, len(prompts), cfg.num_experts)
    assert s["misses"] > 0 and s["hits"] > 0


def sim_layer(trace, slots, batch, num_experts):
    """Hits per MoE layer from the host ExpertCache (LRU) driven as the simulator drives it."""
    from ef_jax.cache.expert_cache import ExpertCache
    cache = ExpertCache(trace.shape[1], num_experts, slots, "lru")
    for t in range(0, len(trace), batch):
        cache.begin_step()
        for j in range(trace.shape[1]):
            cache.route(j, np.unique(trace[t:t + batch, j]))
            cache.arrive_all()
            cache.release(j)
        cache.end_step()
    return cache.layer_hits


def test_tapped_step_runs_layer_by_layer_on_the_device(runs):
    """A hidden-state tap (record) splits the step per MoE layer, still without host syncs for the cache: the same
    hidden states and routing as resident (every expert fits: one pass, so the sums are bit-identical)."""
    from ef_jax.engine.loop.decode import record
    from ef_jax.engine.forward.forward import Forward
    model = runs.model("qwen3moe-norm")
    chunks = [PROMPTS[0]]
    with Forward(model) as fwd:
        ref_h, ref_e = record(fwd, chunks, "moe")
    with Forward(model, OffloadConfig(slots_per_layer=model.config.num_experts, step="device", check=True)) as fwd:
        h, e = record(fwd, chunks, "moe")
        assert fwd.stats()["misses"] > 0
    assert np.array_equal(e, ref_e) and np.array_equal(h, ref_h)


def test_cache_aware_routing_on_the_device(runs):
    """δ = 0 changes nothing (tokens of resident decoding); a large δ swaps choices for resident experts, so fewer
    experts are copied than with exact routing at the same budget."""
    family = "qwen3moe-norm"
    m = runs.model(family)
    slots = m.config.top_k
    off = lambda routing, tol: OffloadConfig(slots_per_layer=slots, policy="lru", step="device", routing=routing,
                                             routing_tolerance=tol)
    zero = ef_jax.generate(m, PROMPTS[:1], max_new_tokens=NEW, offload=off("cache-aware", 0.0))
    assert zero.tokens == runs(family, batch=1).tokens
    exact = ef_jax.generate(m, PROMPTS[:1], max_new_tokens=NEW, offload=off("exact", None))
    loose = ef_jax.generate(m, PROMPTS[:1], max_new_tokens=NEW, offload=off("cache-aware", 1.0))
    assert loose.stats["misses"] < exact.stats["misses"], (loose.stats["misses"], exact.stats["misses"])


@pytest.mark.parametrize("kw, match", [
    (dict(policy="belady"), "'belady' is an offline oracle.*ef-jax sim TRACE --policy belady"),
    (dict(policy=ef_jax.PolicySpec("expertflow", predictor=object())), r"\['predictor'\] have no device version"),
    (dict(timing="h100"), "virtual clock.*use step='layer'"),
])
def test_refusals_name_the_fix(runs, kw, match):
    model = runs.model("olmoe")
    with pytest.raises(ValueError, match=match):
        ef_jax.generate(model, [[1, 2]], max_new_tokens=2, offload=OffloadConfig(slots_per_layer=4, step="device",
                                                                                  **kw))
    with pytest.raises(ValueError, match="step='gpu' must be one of"):
        OffloadConfig(slots_per_layer=4, step="gpu")


def test_pallas_kernel_inside_the_step(runs):
    """The step program's expert FFN through kernels_pallas (interpret mode; a StepPlan field, so a static argument)
    decodes the XLA path's tokens (a partial budget, batch 3: the prefill's grouped regime and decode's)."""
    import dataclasses
    model = dataclasses.replace(runs.model("qwen3moe-norm"), expert_kernel="pallas-interpret")
    ref = runs("qwen3moe-norm", "half", 3, "lfu")
    offload = OffloadConfig(slots_per_layer=max(model.config.top_k, model.config.num_experts // 2), policy="lfu",
                            step="device")
    assert ef_jax.generate(model, PROMPTS[:3], max_new_tokens=NEW, offload=offload).tokens == ref.tokens
