"""Offloaded decoding against all-resident decoding, token for token, plus the engine's budget and telemetry."""
import json
import os
import weakref

import jax
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.engine.sources.context import policy_context
from ef_jax.model import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
FAMILIES = ["mixtral-top2", "qwen2moe-norm-sparse-step", "qwen3moe-norm", "olmoe", "deepseek-qlora-grouped-yarn"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint(request.param))


_RESIDENT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resident_tokens(model, prompts, n: int):
    """All-resident greedy tokens, computed once per (model, prompts, n) and shared by the policies' tests."""
    runs = _RESIDENT.setdefault(model, {})
    key = (repr(prompts), n)
    if key not in runs:
        runs[key] = ef_jax.generate(model, prompts, max_new_tokens=n).tokens
    return runs[key]


def partial_slots(cfg) -> int:
    """A budget between the minimum and every expert. The module's partial-budget tests share it: on a CI CPU each
    (batch, slots) shape is seconds of compiling, so tests that can run on the same shape do."""
    return min(cfg.num_experts, cfg.num_experts // 2 + 1)


@pytest.mark.parametrize("policy", ["lru", "lfu", "nocache"])
def test_offloaded_tokens_equal_resident(model, policy):
    """Every family and policy, at the minimum budget at batch 1 and 3, and at a partial budget at batch 3."""
    cfg = model.config
    for prompts in (PROMPTS[:1], PROMPTS):
        ref = resident_tokens(model, prompts, 6)
        for slots in (cfg.top_k,) if len(prompts) == 1 else (cfg.top_k, partial_slots(cfg)):
            res = ef_jax.generate(model, prompts, max_new_tokens=6,
                                  offload=OffloadConfig(slots_per_layer=slots, policy=policy, check=True))
            assert res.tokens == ref, (policy, slots, len(prompts))
            s = res.stats
            assert s["hits"] + s["misses"] > 0 and s["h2d_bytes"] == s["cache_loads"] * model.param_bytes()["per_expert"]
            if policy == "nocache":
                assert s["hits"] == 0


def test_budget_below_top_k_is_rejected(model):
    cfg = model.config
    per = model.param_bytes()["per_expert"]
    with pytest.raises(ValueError, match=rf"minimum is {cfg.top_k} slots per layer = {cfg.top_k * per * cfg.num_moe_layers:,} bytes"):
        ef_jax.generate(model, [[1, 2]], offload=OffloadConfig(expert_memory=per * cfg.num_moe_layers, policy="lru"))


def test_expert_memory_never_exceeds_budget(model):
    cfg = model.config
    per = model.param_bytes()["per_expert"]
    budget = per * cfg.num_moe_layers * (cfg.top_k + 1) - 1  # one byte short of an extra slot in every layer
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=4, offload=OffloadConfig(expert_memory=budget))
    assert res.stats["slots_per_layer"] == cfg.top_k
    assert res.stats["expert_bytes_resident"] <= budget


def test_option_errors():
    with pytest.raises(ValueError, match="exactly one of expert_memory"):
        OffloadConfig()
    with pytest.raises(ValueError, match="is not a size"):
        OffloadConfig(expert_memory="lots")
    from ef_jax.cache.config import parse_bytes
    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("1.5GB") == 1_500_000_000


def test_slot_write_is_in_place():
    from ef_jax.models.moe import ExpertPool
    from ef_jax.engine.transfer.store import write_slot
    zeros = jax.numpy.zeros
    pool = ExpertPool(gate=zeros((2, 4, 8, 6)), up=zeros((2, 4, 8, 6)), down=zeros((2, 4, 6, 8)))  # [L, S, ...]
    ptr = pool.gate.unsafe_buffer_pointer()
    flat = jax.numpy.arange(3 * 8 * 6, dtype=jax.numpy.float32)
    new = write_slot(pool, flat, jax.numpy.int32(1), jax.numpy.int32(2))
    assert new.gate.unsafe_buffer_pointer() == ptr          # donated: the pool was updated in place
    np.testing.assert_array_equal(np.asarray(new.up[1, 2]).ravel(), np.arange(48, 96))
    assert float(np.abs(np.asarray(new.gate[0])).sum()) == 0 and float(np.abs(np.asarray(new.gate[1, 1])).sum()) == 0


def test_timeline_written(model, tmp_path):
    path = str(tmp_path / "timeline.json")
    cfg = model.config
    ef_jax.generate(model, PROMPTS[:1], max_new_tokens=3,
                    offload=OffloadConfig(slots_per_layer=cfg.top_k, policy="lru", record_timeline=path))
    events = json.load(open(path))["traceEvents"]
    names = [e["name"] for e in events if e["ph"] == "X"]
    assert any(n.startswith("H2D") for n in names) and any(n.startswith("experts") for n in names)
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")


def test_bench_offload_tiny_mode_runs(tmp_path):
    from tests.bench_loader import load_benchmark
    bench = load_benchmark("bench_offload")
    # two batches (the loop, and drop_resident between them), one budget: every kind of row, half the tiny default's
    # compiled (batch, slots) shapes (1, 8 × 25, 50 %)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--batches", "1,2", "--budgets", "0.5"]) == 0
    rows = json.load(open(tmp_path / "offload_tiny.json"))["rows"]
    assert {r["policy"] for r in rows} == {"resident", "nocache", "lru"} and {r["batch"] for r in rows} == {1, 2}
    assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("policy", ["lru", "lfu", "nocache"])
def test_simulator_replay_agrees_with_engine(model, policy):
    """Replaying the routing the engine recorded gives the engine's hits and misses (one token per step), also for
    a batch of 3 rows at the minimum budget, whose unions exceed the slots: both run the same layer plan
    (ef_jax.cache.plan), in passes."""
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.sim.replay import replay
    cfg = model.config
    # the batch's union fits its slots in the first two, and exceeds them in the third
    for prompts, slots in (([[7]], cfg.top_k), ([[7], [50]], 2 * cfg.top_k), ([[7], [50], [33]], cfg.top_k)):
        slots = min(slots, cfg.num_experts)
        offload = OffloadConfig(slots_per_layer=slots, policy=policy)
        fwd = Forward(model, offload)
        sample_rows(fwd, make_batch(prompts, 12), SamplingParams(), 0, set(), 12)
        trace = np.concatenate(fwd.source.routing_log)              # [steps · B, L_moe, K], rows of a step together
        sim = replay(trace, slots_per_layer=slots, policy=policy, batch_size=len(prompts),
                     num_experts=cfg.num_experts)
        assert (sim.hits, sim.misses) == (fwd.source.cache.hits, fwd.source.cache.misses)
        steps = trace.reshape(-1, len(prompts), *trace.shape[1:])   # [steps, B, L_moe, K]
        split = max(len(np.unique(st[:, l])) for st in steps for l in range(trace.shape[1])) > slots
        assert split == (len(prompts) == 3), "the third case must run some layer in passes"
        # layers whose experts had all landed ran before the cache's accounting: as many as a textbook LRU finds
        all_hit = fwd.stats()["layers_all_hit"]
        if policy == "lru" and not split:  # (the textbook LRU below holds a step's union at once)
            assert all_hit == _lru_all_hit_layers(trace, len(prompts), slots)
        elif policy == "nocache":  # flushed every step: nothing is ever resident at routing time
            assert all_hit == 0


def _lru_all_hit_layers(trace: np.ndarray, batch: int, slots: int) -> int:
    """(step, layer) pairs whose needed experts (the union of the step's rows) were all resident, under a textbook
    LRU of `slots` experts per layer. trace i32[steps · batch, L, K]."""
    count = 0
    for layer in range(trace.shape[1]):
        recent: list[int] = []  # resident experts, least recent first
        for step in range(0, len(trace), batch):
            needed = sorted(set(trace[step:step + batch, layer].ravel().tolist()))
            count += all(e in recent for e in needed)
            for e in needed:
                if e in recent:
                    recent.remove(e)
                elif len(recent) >= slots:
                    recent.remove(next(r for r in recent if r not in needed))
                recent.append(e)
    return count


def test_bfloat16_offloaded_tokens_equal_resident(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("deepseek-qlora-grouped-yarn"), dtype="bfloat16")
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=6).tokens
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=6,
                          offload=OffloadConfig(slots_per_layer=model.config.top_k, check=True))
    assert res.tokens == ref


class _EchoPrefetch:
    """Test policy: LRU, plus prefetching this layer's experts for the next layer and for the next step, and
    recording the hidden states it is shown. It exercises the engine's prefetch, arrival and on_hidden paths."""

    def __init__(self):
        from ef_jax.policies import get_policy
        self._lru = get_policy("lru")
        self.hidden_shapes = []

    def __getattr__(self, name):  # every other hook: plain LRU
        return getattr(self._lru, name)

    wants_hidden = True

    def on_route(self, layer, experts, view):
        nxt = [(layer + 1, int(e)) for e in experts if layer + 1 < view.num_layers]
        return nxt + [(layer, int(e)) for e in experts]  # already resident: skipped by the cache

    def on_hidden(self, layer, hidden, view):
        self.hidden_shapes.append(hidden.shape)
        return []

    def on_step_end(self, step, view):
        last = view.routed(step, view.num_layers - 1)
        return [] if last is None else [(0, int(e)) for e in last]


def test_prefetching_policy_keeps_tokens_and_counts(model):
    cfg = model.config
    policy = _EchoPrefetch()
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=8).tokens
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=8,
                          offload=OffloadConfig(slots_per_layer=partial_slots(cfg), policy=policy, check=True))
    assert res.tokens == ref
    s = res.stats
    if cfg.num_moe_layers > 1:  # with one MoE layer every prefetch names an already-resident expert
        assert s["cache_prefetch_issued"] > 0
    assert s["cache_prefetch_used"] + s["cache_prefetch_wasted"] <= s["cache_prefetch_issued"]
    assert policy.hidden_shapes and all(h[-1] == cfg.hidden_size for h in policy.hidden_shapes)


def test_pallas_kernel_inside_the_engine(tiny_checkpoint, monkeypatch):
    """The layer mode's expert programs through kernels_pallas (interpret mode) give the XLA path's tokens, and two
    models with different kernels in one process each trace their own: every program traced for the pallas model
    calls the kernel, none traced for the xla model does (a new prompt length is a new trace for both, after the
    other model ran)."""
    import kernels_pallas
    traced = []  # one entry per trace of the Pallas kernel (calls inside a jit happen at trace time)
    kernel = kernels_pallas.expert_ffn
    monkeypatch.setattr(kernels_pallas, "expert_ffn", lambda *a, **kw: traced.append(kw) or kernel(*a, **kw))
    path = tiny_checkpoint("qwen3moe-norm")
    xla, pallas = ef_jax.load(path), ef_jax.load(path, expert_kernel="pallas-interpret")
    offload = OffloadConfig(slots_per_layer=xla.config.top_k)
    for prompts in (PROMPTS[:2], [PROMPTS[0][:5]]):
        ref = ef_jax.generate(xla, prompts, max_new_tokens=3, offload=offload).tokens
        assert traced == []
        got = ef_jax.generate(pallas, prompts, max_new_tokens=3, offload=offload).tokens
        assert got == ref and traced and all(kw["interpret"] for kw in traced)
        traced.clear()
    assert ef_jax.generate(xla, [PROMPTS[2]], max_new_tokens=2, offload=offload).tokens and traced == []


def test_pregate_prediction_matches_the_router(model):
    """Pregate's guess for layer j+1 is exactly that layer's router applied to the normalised hidden state."""
    import jax.numpy as jnp
    from ef_jax.models.layers import rms_norm
    from ef_jax.models.moe import route
    from ef_jax.policies import Pregate
    cfg = model.config
    if cfg.num_moe_layers < 2:
        pytest.skip("needs two MoE layers")
    pol = Pregate.from_context(policy_context(model))
    h = np.random.RandomState(0).randn(3, cfg.hidden_size).astype(np.float32)
    nxt = cfg.moe_layer_ids[1]
    p = model.params["layers"][nxt]
    want = route(p["mlp"], cfg, rms_norm(jnp.asarray(h), p["mlp_norm"], cfg.rms_norm_eps))
    got = pol.predict(0, h)
    if cfg.topk_method == "greedy":
        assert set(got[1].tolist()) == set(np.asarray(want.experts).ravel().tolist())


def test_pregate_policy_keeps_tokens_and_prefetches(model):
    cfg = model.config
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=6).tokens
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=6,
                          offload=OffloadConfig(slots_per_layer=partial_slots(cfg), policy="pregate", check=True))
    assert res.tokens == ref
    if cfg.num_moe_layers > 1:
        assert res.stats["cache_prefetch_issued"] > 0


@pytest.fixture(scope="module")
def default_model():
    return ef_jax.load()


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")),
                    reason="the default model is not shipped in this build")
@pytest.mark.parametrize("policy", ["lru", "lfu", "nocache"])
def test_default_model_offloaded_tokens_equal_resident(default_model, policy):
    """The shipped model (10 MoE layers × 32 experts: each (batch, slots) shape is most of a minute of compiling on a
    CI CPU), every policy at two of the shapes: batch 1 at the minimum budget, batch 3 at a quarter of the experts
    (test_expertflow's shape for the same prompts: the run's compile cache shares programs). The tiny families run
    batch 3 at the minimum budget too, where a batch's union exceeds the slots."""
    model = default_model
    cfg = model.config
    prompts = ["To be, or not", "def main(", "In the beginning"]
    for batch, slots in ((prompts[:1], cfg.top_k), (prompts, cfg.num_experts // 4)):
        ref = resident_tokens(model, batch, 6)
        res = ef_jax.generate(model, batch, max_new_tokens=6, offload=OffloadConfig(slots_per_layer=slots,
                                                                                      policy=policy))
        assert res.tokens == ref, (policy, slots, len(batch))
