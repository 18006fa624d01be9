"""generate(batch_size=, schedule=): route-aware batches give every prompt the tokens it gets in arrival order, and
one expert cache serves every batch without ever holding more experts on the device than its slots."""
import threading
import time

import jax
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig

PROMPTS = [[5, 17, 33, 2], [88, 3, 60, 12], [5, 17, 33, 9], [88, 3, 61, 12]]  # one length: one compilation


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint("mixtral-top2"))


def test_route_schedule_keeps_every_prompts_tokens(model):
    arrival = ef_jax.generate(model, PROMPTS, batch_size=2, schedule="arrival", max_new_tokens=3)
    route = ef_jax.generate(model, PROMPTS, batch_size=2, schedule="route", max_new_tokens=3)
    assert arrival.stats["batches"] == [[0, 1], [2, 3]]
    assert sorted(i for b in route.stats["batches"] for i in b) == list(range(4))
    assert all(len(b) == 2 for b in route.stats["batches"])
    assert route.tokens == arrival.tokens and all(len(t) == 3 for t in route.tokens)
    alone = [ef_jax.generate(model, [p], max_new_tokens=3).tokens[0] for p in PROMPTS]
    assert route.tokens == alone
    with pytest.raises(ValueError, match="schedule="):
        ef_jax.generate(model, PROMPTS, batch_size=2, schedule="fastest")


def test_batching_keeps_one_stats_shape(model):
    plain = ef_jax.generate(model, PROMPTS[:2], max_new_tokens=2, offload=OffloadConfig(slots_per_layer=2))
    batched = ef_jax.generate(model, PROMPTS, max_new_tokens=2, offload=OffloadConfig(slots_per_layer=2),
                              batch_size=2)
    assert set(plain.stats) <= set(batched.stats)
    assert 0 <= batched.stats["hit_rate"] <= 1 and batched.stats["generated_tokens"] == 8


class _LiveExpertBytes:
    """Samples the device's live arrays from a background thread while a call runs: the peak bytes of
    expert-shaped arrays that were not alive before it started."""

    def __init__(self, shapes):
        self.shapes, self.peak, self.samples = shapes, 0, 0
        self.before = {id(a) for a in jax.live_arrays()}  # other tests' models may hold their experts
        self._stop = threading.Event()

    def _sample(self):
        live = 0
        for a in jax.live_arrays():
            if id(a) in self.before or a.is_deleted() or a.ndim < 3 or tuple(a.shape[-2:]) not in self.shapes:
                continue
            if a.sharding.memory_kind in (None, "device"):
                live += a.nbytes
        self.peak = max(self.peak, live)
        self.samples += 1

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_route_scheduled_offload_never_holds_more_than_its_slots(tiny_checkpoint):
    """Bug: the route schedule profiled prompts through an all-resident forward, uploading every expert, and
    each batch started with a cold cache. Now profiling and every batch run through one offloaded Forward."""
    fresh = ef_jax.load(tiny_checkpoint("mixtral-top2"))  # nothing resident from other tests
    cfg = fresh.config
    D, F = cfg.hidden_size, cfg.moe_intermediate
    S = cfg.top_k
    with _LiveExpertBytes({(D, F), (F, D)}) as watch:
        res = ef_jax.generate(fresh, PROMPTS, max_new_tokens=3, batch_size=2, schedule="route",
                              offload=OffloadConfig(slots_per_layer=S))
    per_expert = fresh.param_bytes()["per_expert"]
    assert watch.samples > 10 and 0 < watch.peak <= cfg.num_moe_layers * S * per_expert
    assert res.tokens == ef_jax.generate(fresh, PROMPTS, max_new_tokens=3, batch_size=2).tokens
    assert res.stats["cache_steps"] > 2 * 3  # one cache for the profiling passes and both batches
