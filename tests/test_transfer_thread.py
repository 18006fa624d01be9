"""Copies from a background thread (OffloadConfig(transfers="thread")): the same tokens and the same cache
decisions as inline copies, slot contents verified after every layer, with demand loads and prefetches."""
import pytest

import ef_jax
from ef_jax import OffloadConfig

pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]


@pytest.fixture(scope="module", params=["deepseek-qlora-grouped-yarn"])
def model(request, tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint(request.param))


@pytest.mark.parametrize("policy", ["lru", "pregate", "expertflow"])
def test_threaded_copies_keep_tokens_and_decisions(model, policy):
    cfg = model.config
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=8).tokens
    for slots in (cfg.top_k, cfg.num_experts // 2 + 1):
        inline = ef_jax.generate(model, PROMPTS, max_new_tokens=8,
                                 offload=OffloadConfig(slots_per_layer=slots, policy=policy))
        for check in (True, False):
            res = ef_jax.generate(model, PROMPTS, max_new_tokens=8,
                                  offload=OffloadConfig(slots_per_layer=slots, policy=policy, transfers="thread",
                                                        check=check))
            assert res.tokens == ref, (policy, slots, check)
            assert res.stats["clock"] == "wall" and res.stats["copier"] == "thread"
            assert res.stats["h2d_bytes"] == res.stats["cache_loads"] * model.param_bytes()["per_expert"]
            if policy == "lru":  # no timing-dependent prefetch decisions: identical counters
                assert (res.stats["hits"], res.stats["misses"]) == (inline.stats["hits"], inline.stats["misses"])


def test_transfers_option_is_validated():
    with pytest.raises(ValueError, match="transfers='threads' must be one of"):
        OffloadConfig(slots_per_layer=2, transfers="threads")
