"""Cache-aware token scheduling: TokenScheduler.pick(resident=) and the simulator that interleaves picks with the
cache (TokenPool.steps(view) under replay_steps)."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ef_jax.cache.expert_cache import ExpertCache
from ef_jax.sched import TokenScheduler, predicted_sets
from ef_jax.sim.batched import TokenPool, pooled_steps, replay_batches, replay_steps, residency

case_st = st.tuples(st.integers(1, 14), st.integers(1, 4), st.integers(1, 3), st.integers(0, 10**6))


def _candidates(C, seed, F=12):
    rng = np.random.default_rng(seed)
    return ((rng.random((C, F)) < 0.3).astype(np.float32), rng.integers(0, 4, C),
            (rng.random(F) < 0.5).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(case_st)
def test_a_uniform_residency_gives_the_plain_greedys_choice(case):
    C, B, max_wait, seed = case
    sets, waited, _ = _candidates(C, seed)
    sched = TokenScheduler(B, max_wait=max_wait, cache_aware=True)
    plain = sched.pick(sets, waited)
    for r in (np.zeros(sets.shape[1]), np.ones(sets.shape[1])):   # nothing / everything resident
        assert sched.pick(sets, waited, resident=r) == plain


@settings(max_examples=60, deadline=None)
@given(case_st)
def test_cache_aware_pick_runs_overdue_tokens_and_counts_only_missing_experts(case):
    C, B, max_wait, seed = case
    sets, waited, resident = _candidates(C, seed)
    picked = TokenScheduler(B, max_wait=max_wait).pick(sets, waited, resident=resident)
    assert len(picked) == min(B, C) and len(set(picked)) == len(picked)
    overdue = np.flatnonzero(waited >= max_wait)
    if C > B and len(overdue) <= B:
        assert set(overdue.tolist()) <= set(picked)
    if C > B >= 2 and len(overdue) == 0:    # the second token adds the fewest experts neither in batch nor resident
        load = sets @ ((1.0 - sets[picked[0]]) * (1.0 - resident))
        others = np.delete(np.arange(C), picked[0])
        assert load[picked[1]] == load[others].min()


def test_pick_validates_residency_and_flags():
    sets = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"resident must be f32\[4\]"):
        TokenScheduler(2).pick(sets, np.zeros(4, int), resident=np.zeros(3))
    with pytest.raises(ValueError, match="route=True"):
        TokenScheduler(2, route=False, cache_aware=True)
    assert TokenScheduler(2, cache_aware=True).name == "route+cache"


def _random_trace(seed, P=10, L=2, E=6, K=2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, P)
    N = int(lengths.sum())
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(N)])
    scores = rng.random((N, L, E)).astype(np.float32)
    return experts.astype(np.uint8), np.concatenate([[0], np.cumsum(lengths)]), predicted_sets(scores, K)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_interleaved_replay_keeps_the_wait_bound_and_plain_schedulers_unchanged(seed, B, max_wait, aware):
    experts, offsets, sets = _random_trace(seed)
    kw = dict(slots_per_layer=3, policy="lru", timing="h100", num_experts=6)
    sched = TokenScheduler(B, max_wait=max_wait, cache_aware=aware)
    st_ = replay_batches(experts, offsets, sched, sets=sets, pool=2 * B, check=True, **kw)
    assert st_.max_wait <= max_wait and st_.tokens == len(experts)   # pool ≤ 2B: overdue tokens always fit
    if not aware:   # regression: the interleaved path replays exactly the precomputed steps
        steps, info = pooled_steps(experts, offsets, sets, sched, pool=2 * B)
        ref = replay_steps(steps, len(experts), num_layers=2, **kw)
        assert st_ == dataclasses.replace(ref, batch_size=B, max_wait=info["max_wait"])


def test_cache_aware_scheduler_reuses_resident_experts():
    """Requests cycle through three kinds, using experts {0, 1}, {2, 3}, {4, 5} (one layer, oracle sets); B = 2,
    pool 4, 4 slots (two kinds). Every pair of the same kind costs the plain greedy nothing, so it pairs whichever
    kind the longest-waiting token has; the cache-aware one prefers the pair whose kind is still resident."""
    n, length = 12, 6
    experts = np.array([[[2 * (r % 3), 2 * (r % 3) + 1]] for r in range(n) for _ in range(length)], np.uint8)
    offsets = np.arange(0, n * length + 1, length)
    sets = predicted_sets(np.eye(6, dtype=np.float32)[experts].sum(2), 2)
    kw = dict(slots_per_layer=4, policy="lru", timing="h100", num_experts=6, sets=sets, pool=4)
    plain = replay_batches(experts, offsets, TokenScheduler(2, max_wait=4), **kw)
    aware = replay_batches(experts, offsets, TokenScheduler(2, max_wait=4, cache_aware=True), **kw)
    assert (plain.loads, aware.loads) == (66, 54) and aware.max_wait <= 4
    assert aware.tokens == plain.tokens == n * length


def test_residency_reads_the_cache_in_the_layout_of_predicted_sets():
    cache = ExpertCache(2, 4, 2, "lru")
    cache.begin_step()
    cache.route(0, [1, 3])
    cache.release(0)
    cache.route(1, [0])
    cache.release(1)
    cache.end_step()
    np.testing.assert_array_equal(residency(cache.view), [0, 1, 0, 1, 1, 0, 0, 0])
    pool = TokenPool(np.zeros((1, 2, 1), np.uint8), np.array([0, 1]), np.zeros((1, 8), np.float32),
                     TokenScheduler(1), pool=1)
    assert list(pool.steps()) == [[[0], [0]]] and pool.num_steps == 1 and pool.rows == 1
