"""Token scheduler invariants (hypothesis) and the simulator's batched replay on hand-checkable cases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ef_jax.sched import (ContinuousScheduler, TokenScheduler, arrival_batches, predicted_sets, request_profiles,
                          route_batches)
from ef_jax.sched.route_scheduler import expected_distinct
from ef_jax.sim.batched import batch_steps, continuous_steps, pooled_steps, replay_batches

profiles_st = st.integers(1, 24).flatmap(lambda P: st.lists(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=6, max_size=6), min_size=P, max_size=P))


@settings(max_examples=60, deadline=None)
@given(profiles_st, st.integers(1, 9))
def test_route_batches_schedule_every_request_once_within_the_batch_size(profiles, B):
    p = np.array(profiles, np.float32)
    batches = route_batches(p, B)
    flat = [r for b in batches for r in b]
    assert sorted(flat) == list(range(len(p)))                       # every request exactly once
    assert all(1 <= len(b) <= B for b in batches)
    assert all(len(b) == B for b in batches[:-1])                    # the greedy fills every batch but the last
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)  # seeds: the oldest waiting request
    assert route_batches(p, B) == batches                            # deterministic


@settings(max_examples=40, deadline=None)
@given(profiles_st, st.integers(1, 5), st.booleans())
def test_continuous_scheduler_admits_each_request_once(profiles, B, route):
    p = np.array(profiles, np.float32)
    sched = ContinuousScheduler(p, B, route=route, window=2)
    waiting, running, seen = list(range(len(p))), [], []
    while waiting:
        joined = sched.admit(running, waiting)
        assert len(running) + len(joined) <= B and joined
        seen += joined
        running = (running + joined)[1:]                             # one row finishes per step
    assert sorted(seen) == list(range(len(p)))
    if not route:
        assert seen == list(range(len(p)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(0, 10**6))
def test_token_scheduler_picks_at_most_b_distinct_and_never_starves(C, B, max_wait, route, seed):
    rng = np.random.default_rng(seed)
    sets = (rng.random((C, 10)) < 0.3).astype(np.float32)
    sched = TokenScheduler(B, route=route, max_wait=max_wait)
    waited = np.zeros(C, int)
    for _ in range(6):
        picked = sched.pick(sets, waited)
        assert len(picked) == min(B, C) and len(set(picked)) == len(picked)
        assert picked == sched.pick(sets, waited)                    # deterministic
        overdue = np.flatnonzero(waited >= max_wait)
        if route and 0 < len(overdue) <= B:
            assert set(overdue.tolist()) <= set(picked)              # overdue tokens always run
        waited += 1
        waited[picked] = 0


def test_route_batches_group_requests_with_the_same_experts():
    a, b = [1, 1, 0, 0], [0, 0, 1, 1]
    p = np.array([a, b, a, b, a, b], np.float32)
    assert route_batches(p, 3) == [[0, 2, 4], [1, 3, 5]]
    assert arrival_batches(6, 4) == [[0, 1, 2, 3], [4, 5]]
    assert expected_distinct(p, [0, 2, 4], num_layers=1) == 2 and expected_distinct(p, [0, 1], num_layers=1) == 4
    with pytest.raises(ValueError, match="probabilities"):
        route_batches(p * 2, 3)


def test_profiles_and_predicted_sets():
    scores = np.zeros((4, 1, 3), np.float32)
    scores[[0, 1, 2, 3], 0, [0, 0, 1, 2]] = 1           # top-1: experts 0, 0, 1, 2
    prof = request_profiles(scores, np.array([0, 2, 4]), top_k=1)
    np.testing.assert_allclose(prof, [[1, 0, 0], [0, 0.5, 0.5]])
    np.testing.assert_allclose(request_profiles(scores, np.array([0, 2, 4]), top_k=1, prefix=1), [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(predicted_sets(scores, 1)[2], [0, 1, 0])


# ---- batched replay ---------------------------------------------------------------------------------------------
def _two_kinds_trace(n_requests=8, length=5):
    """Even requests always use experts {0, 1}, odd ones {2, 3} (one layer, top-2 of 4)."""
    experts = np.array([[[0, 1]] if r % 2 == 0 else [[2, 3]] for r in range(n_requests) for _ in range(length)],
                       np.uint8)
    return experts, np.arange(0, n_requests * length + 1, length)


def test_batch_steps_take_the_union_of_running_requests():
    experts, offsets = _two_kinds_trace(n_requests=3, length=2)
    offsets = np.array([0, 2, 3, 6])                      # lengths 2, 1, 3
    steps = batch_steps(experts, offsets, [[0, 1], [2]])
    assert steps == [[[0, 1, 2, 3]], [[0, 1]], [[2, 3]], [[0, 1]], [[0, 1]]]   # request 2 = tokens 3, 4, 5
    with pytest.raises(ValueError, match="exactly once"):
        batch_steps(experts, offsets, [[0, 1], [1, 2]])
    cont = continuous_steps(experts, offsets, ContinuousScheduler(np.zeros((3, 1)), 2, route=False))
    assert len(cont) == 4 and cont[1] == [[0, 1, 2, 3]]   # request 2 joins as soon as request 1 ends


def test_route_batching_halves_distinct_experts_and_bytes():
    experts, offsets = _two_kinds_trace()
    prof = request_profiles(experts_to_scores(experts), offsets, top_k=2)
    kw = dict(slots_per_layer=2, policy="lru", timing="h100", num_experts=4)
    arrival = replay_batches(experts, offsets, arrival_batches(8, 2), **kw)
    route = replay_batches(experts, offsets, route_batches(prof, 2), **kw)
    assert arrival.distinct_per_layer == 4 and route.distinct_per_layer == 2
    assert route.bytes_per_token < arrival.bytes_per_token and route.stall_s < arrival.stall_s
    assert route.tokens == arrival.tokens == 40 and route.steps == arrival.steps == 20


def test_token_scheduler_replay_groups_tokens_and_bounds_waiting():
    experts, offsets = _two_kinds_trace()
    sets = predicted_sets(experts_to_scores(experts), 2)
    kw = dict(slots_per_layer=2, policy="lru", timing="h100", num_experts=4, sets=sets, pool=4)
    rr = replay_batches(experts, offsets, TokenScheduler(2, route=False), **kw)
    route = replay_batches(experts, offsets, TokenScheduler(2, route=True, max_wait=3), **kw)
    assert route.distinct_per_layer < rr.distinct_per_layer and route.bytes_per_token < rr.bytes_per_token
    assert route.max_wait <= 3 and route.tokens == 40
    steps, info = pooled_steps(experts, offsets, sets, TokenScheduler(2), pool=4)
    assert sum(1 for _ in steps) == route.steps and info["mean_rows"] == 2


def experts_to_scores(experts, num_experts=4):
    out = np.zeros(experts.shape[:2] + (num_experts,), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out
