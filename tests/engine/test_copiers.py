"""Copiers (OffloadConfig(transfers="thread" | "program")): the same tokens and the same cache decisions as inline
copies, slot contents and the device slot table verified after every layer, with demand loads and prefetches; the
in-program copier runs each MoE layer in one dispatch and one host sync, whatever the number of misses."""
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.engine.forward.forward import split_segments

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]


# One family: what a copier does (when and how expert bytes reach their slot) does not depend on the attention or
# routing rule. Qwen3-MoE's two MoE layers (a next layer to prefetch for, a layer chained into the one before it),
# with the prompts, length and budgets of tests/test_offload_engine.py, whose inline programs the run's compile cache
# then holds; every family runs inline copies there.
@pytest.fixture(scope="module", params=["qwen3moe-norm"])
def model(request, tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint(request.param))


@pytest.fixture(scope="module")
def inline_runs(model):
    """The reference runs, shared by every copier: resident tokens, and inline copies per (policy, slots)."""
    runs = {"resident": ef_jax.generate(model, PROMPTS, max_new_tokens=6).tokens}

    def get(policy, slots):
        if (policy, slots) not in runs:
            runs[policy, slots] = ef_jax.generate(
                model, PROMPTS, max_new_tokens=6,
                offload=OffloadConfig(slots_per_layer=slots, policy=policy, transfers="inline"))
        return runs[policy, slots]
    return runs["resident"], get


@pytest.mark.parametrize("transfers", ["thread", "program"])
@pytest.mark.parametrize("policy", ["lru", "pregate", "expertflow"])
def test_copiers_keep_tokens_and_decisions(model, inline_runs, policy, transfers):
    cfg = model.config
    ref, inline_run = inline_runs
    # expertflow (its own hidden-state programs, each shape seconds to compile on a CI CPU) at the minimum budget
    # only, where it prefetches most; lru and pregate at both budgets
    budgets = (cfg.top_k,) if policy == "expertflow" else (cfg.top_k, cfg.num_experts // 2 + 1)
    for slots in budgets:
        inline = inline_run(policy, slots)
        assert inline.tokens == ref, (policy, slots, "inline")
        for check in (True, False):
            res = ef_jax.generate(model, PROMPTS, max_new_tokens=6,
                                  offload=OffloadConfig(slots_per_layer=slots, policy=policy, transfers=transfers,
                                                        check=check))
            assert res.tokens == ref, (policy, slots, check)
            assert res.stats["clock"] == "wall" and res.stats["copier"] == transfers
            assert res.stats["h2d_bytes"] == res.stats["cache_loads"] * model.param_bytes()["per_expert"]
            if policy == "lru":  # no timing-dependent prefetch decisions: identical counters
                assert (res.stats["hits"], res.stats["misses"]) == (inline.stats["hits"], inline.stats["misses"])


def test_transfers_option_is_validated():
    with pytest.raises(ValueError, match="transfers='threads' must be one of"):
        OffloadConfig(slots_per_layer=2, transfers="threads")


@pytest.mark.parametrize("policy", ["nocache", "lru", "expertflow"])
def test_in_program_copies_cost_one_dispatch_and_one_sync_per_moe_layer(model, policy):
    """Per decode step and MoE layer one program: its experts (copies and slot-table updates inside), then the
    next MoE layer's attention + route — however many experts miss; per step two more: the embedding and the
    first layer's attention + route (the padding mask is uploaded only when it changes: not between these steps). The only host syncs are the routing (for
    expertflow with the hidden state its host-side predictor reads, from the same program) and the sampled
    token. Measured as the difference between a 10- and a 4-token run (the prefill, which may split a layer into
    passes, cancels out)."""
    cfg = model.config
    L = cfg.num_moe_layers
    runs = {n: ef_jax.generate(model, [PROMPTS[0]], max_new_tokens=n,
                               offload=OffloadConfig(slots_per_layer=cfg.top_k, policy=policy, transfers="program"))
            for n in (4, 10)}
    steps = runs[10].stats["cache_steps"] - runs[4].stats["cache_steps"]
    assert steps == 6
    delta = {k: runs[10].stats[k] - runs[4].stats[k] for k in ("dispatches", "host_syncs", "misses")}
    dense_groups = sum(kind == "dense" for kind, _ in split_segments(cfg.moe_layers, 4))
    assert delta["dispatches"] == steps * (2 + L + dense_groups), delta
    assert delta["host_syncs"] == steps * (L + 1) and delta["misses"] > 0, delta
    assert runs[10].stats["sync_points"].keys() == {"route", "sample"}
    assert runs[10].stats["expert_program_variants"] <= 12
    inline = ef_jax.generate(model, [PROMPTS[0]], max_new_tokens=10,
                             offload=OffloadConfig(slots_per_layer=cfg.top_k, policy=policy, transfers="inline"))
    assert inline.stats["dispatches"] > runs[10].stats["dispatches"]  # two more dispatches per copy there
    assert runs[10].tokens == inline.tokens


def test_program_variants_are_bounded():
    from ef_jax.engine.transfer.copier import LOAD_BUCKETS, bucket
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 9, 200, 300)] == [0, 1, 2, 4, 8, 16, 256, 512]
    assert len({bucket(n) for n in range(257)}) == len(LOAD_BUCKETS)
