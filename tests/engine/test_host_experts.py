"""Host-computed experts in the engine: tokens and logits equal all-resident decoding; the engine's load / host
decisions equal the simulator's for the same routing."""
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.decode import Rows
from ef_jax.model import DEFAULT_MODEL_DIR
from ef_jax.sim.replay import replay

pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
FAMILIES = ["mixtral-top2", "qwen2moe-norm-sparse-step", "qwen3moe-norm", "olmoe", "deepseek-qlora-grouped-yarn"]


def step_logits(model, offload, seqs: np.ndarray):
    """Teacher-forced logits f32[T-1, B, V] of seqs i32[B, T], and the run's stats."""
    B, T = seqs.shape
    with Forward(model, offload) as fwd:
        rows = Rows(fwd, B, T)
        out = []
        for t in range(T - 1):
            logits, _ = rows.advance(seqs[:, t:t + 1], np.full((B, 1), t, np.int32))
            out.append(np.asarray(logits, np.float32))
        stats = fwd.stats()
    return np.stack(out), stats


def check_equal_resident(model, expert_dtype_label=""):
    cfg = model.config
    rng = np.random.default_rng(0)
    for prompts in (PROMPTS[:1], PROMPTS):
        ref = ef_jax.generate(model, prompts, max_new_tokens=5).tokens
        for mode in ("always", "auto"):
            res = ef_jax.generate(model, prompts, max_new_tokens=5, offload=OffloadConfig(
                slots_per_layer=cfg.top_k, policy="lru", host_compute=mode, timing="equal-rates", check=True))
            assert res.tokens == ref, (mode, len(prompts), expert_dtype_label)
            if mode == "always":
                assert res.stats["host_computed"] > 0 and res.stats["host_computed"] == res.stats["misses"]
    seqs = rng.integers(1, cfg.vocab_size, (3, 6)).astype(np.int32)
    want, _ = step_logits(model, None, seqs)
    for mode in ("always", "auto"):
        got, stats = step_logits(model, OffloadConfig(slots_per_layer=cfg.top_k, host_compute=mode,
                                                      timing="equal-rates"), seqs)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert stats["bytes_not_moved"] == ((stats["host_computed"] - stats["cache_host_behind"])
                                            * stats["bytes_per_expert"])


@pytest.mark.parametrize("name", FAMILIES)
def test_host_compute_equals_resident_on_every_family(tiny_checkpoint, name):
    check_equal_resident(ef_jax.load(tiny_checkpoint(name)))


def test_host_compute_equals_resident_on_the_default_model_and_int8():
    check_equal_resident(ef_jax.load(DEFAULT_MODEL_DIR, dtype="float32"))
    check_equal_resident(ef_jax.load(DEFAULT_MODEL_DIR, dtype="float32", expert_dtype="int8"), "int8")


def test_held_prefetches_keep_tokens_equal_to_resident(tiny_checkpoint):
    """auto with a prefetching policy: held prefetches are loaded into later layers' slots from an earlier
    layer's program; greedy tokens still equal all-resident decoding (batch 1 and 3)."""
    from ef_jax.policies.registry import PolicySpec
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"))
    cfg = model.config
    scores = np.random.default_rng(1).random((64, len(cfg.moe_layer_ids), cfg.num_experts), np.float32)
    for prompts in (PROMPTS[:1], PROMPTS):
        ref = ef_jax.generate(model, prompts, max_new_tokens=5).tokens
        res = ef_jax.generate(model, prompts, max_new_tokens=5, offload=OffloadConfig(
            slots_per_layer=cfg.top_k + 1, policy=PolicySpec("predictive", scores=scores, top_k=cfg.top_k,
                                                             batch_size=len(prompts)),
            host_compute="auto", timing="equal-rates", check=True))
        assert res.tokens == ref, len(prompts)
        assert res.stats["cache_prefetch_issued"] > 0, res.stats


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_engine_and_simulator_agree_on_every_decision(tiny_checkpoint, mode, policy):
    """The engine under a virtual clock and a replay of the routing it recorded make the same load / host /
    copy-behind / held-prefetch decision at every layer of every step, and so count and stall the same.
    predictive: fixed random scores per step, so both sides prefetch the same experts; on h100-measured, whose
    layer compute outlasts a copy, so auto's idle copy time is handed out too."""
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.policies.registry import PolicySpec
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"))
    cfg = model.config
    slots = cfg.top_k + 1
    if policy == "predictive":
        scores = np.random.default_rng(0).random((64, len(cfg.moe_layer_ids), cfg.num_experts), np.float32)
        policy = PolicySpec("predictive", scores=scores, top_k=cfg.top_k)
    timing = "equal-rates" if isinstance(policy, str) else "h100-measured"
    off = OffloadConfig(slots_per_layer=slots, policy=policy, host_compute=mode, timing=timing)
    with Forward(model, off) as fwd:
        sample_rows(fwd, make_batch([[7]], 16), SamplingParams(), 0, set(), 16)
        trace = np.concatenate(fwd.source.routing_log)  # [steps, L_moe, K]
        engine_log = list(fwd.source.host.log)
        s = fwd.stats()
    sim_log = []
    sim = replay(trace, slots_per_layer=slots, policy=policy, timing=timing, num_experts=cfg.num_experts,
                 host_compute=mode, decisions=sim_log)
    norm = lambda log: [(j, sorted(a), sorted(b), sorted(c), f, n) for j, a, b, c, f, n in log]  # sim: router order
    assert norm(engine_log) == norm(sim_log)
    assert sum(len(h) for _, _, h, *_ in sim_log) > 0
    if mode == "auto" and not isinstance(policy, str):  # held prefetches and idle time were handed out (agreed on)
        assert sum(len(f) for *_, f, _ in sim_log) > 0 and sum(n for *_, n in sim_log) > 0
    assert (sim.hits, sim.misses, sim.host_computed) == (s["hits"], s["misses"], s["host_computed"])
    assert sim.stall_s == pytest.approx(s["stall_s"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("expert_dtype", [None, "int8", "int4"])
def test_host_ffn_matches_the_reference(expert_dtype):
    """HostFFN over a store's pinned buffers (float, or quantized and dequantized inside) vs plain numpy SwiGLU."""
    import jax.numpy as jnp
    from ef_jax.engine.programs.host_ffn import HostFFN, StoreWeights, host_ffn_reference
    from ef_jax.engine.transfer.store import ExpertStore
    from ef_jax.host_experts import ArrayRows
    from ef_jax.quant.codes import spec_for
    from ef_jax.quant.pool import quantize_experts
    rng = np.random.default_rng(0)
    E, D, F = 4, 64, 32
    ex = {m: (rng.normal(size=s) * 0.1).astype(np.float32) for m, s in
          (("gate", (E, D, F)), ("up", (E, D, F)), ("down", (E, F, D)))}
    if expert_dtype is not None:
        q = quantize_experts(ex, spec_for(expert_dtype, None, "float32"))
        store = ExpertStore(ArrayRows([q]))
        mats = {m: np.asarray(q.matrix(m, None, jnp.float32)) for m in ("gate", "up", "down")}
    else:
        store, mats = ExpertStore(ArrayRows([ex])), ex
    x = rng.normal(size=(3, D)).astype(np.float32)
    pairs = {1: (np.array([0, 2], np.int32), np.array([0.5, 0.25], np.float32)),
             3: (np.array([1], np.int32), np.array([1.0], np.float32))}
    got = np.asarray(HostFFN(StoreWeights(store)).start(0, x, pairs))
    want = np.zeros((3, D))
    for e, (idx, w) in pairs.items():
        want[idx] += host_ffn_reference(x[idx], mats["gate"][e], mats["up"][e], mats["down"][e]) * w[:, None]
    np.testing.assert_allclose(got, want, atol=1e-5)
