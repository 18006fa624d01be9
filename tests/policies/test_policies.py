"""Policies: reference LRU, Belady optimality, nocache, LFU ties, the registry (ExpertCache itself:
tests/cache/test_expert_cache.py)."""
import collections
import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ef_jax.cache import ExpertCache, Load
from ef_jax.policies import Belady, get_policy, policy_names


@st.composite
def traces(draw, max_tokens=40):
    """(experts i[N, L, K], S): random routing with unique experts per row and K ≤ S ≤ E."""
    E = draw(st.integers(3, 9))
    K = draw(st.integers(1, min(3, E)))
    S = draw(st.integers(K, E))
    N = draw(st.integers(1, max_tokens))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.ones(E) * 0.5)  # skewed popularity, so caching matters
    x = np.stack([[rng.choice(E, K, replace=False, p=skew) for _ in range(L)] for _ in range(N)])
    return x.astype(np.int32), S


def drive(x, S, policy, **kw):
    """Replay x [N, L, K] one token per step, no clock; returns the cache."""
    N, L, K = x.shape
    cache = ExpertCache(L, int(x.max()) + 1 if x.max() + 1 >= S else S, S, policy, check=True, **kw)
    for n in range(N):
        cache.begin_step()
        for l in range(L):
            for ld in cache.route(l, x[n, l].tolist()):
                cache.arrive(ld.layer, ld.expert)
            assert all(cache.table.is_resident(l, e) for e in x[n, l])
            cache.release(l)
        cache.end_step()
    return cache


def reference_lru_hits(x, S):
    """Textbook LRU per layer (an OrderedDict from least to most recently used), accesses in order, except that
    a token's own experts are never the victim (all K must be resident together)."""
    hits = 0
    N, L, K = x.shape
    for l in range(L):
        lru = collections.OrderedDict()
        for n in range(N):
            need = x[n, l].tolist()
            for e in need:
                if e in lru:
                    hits += 1
                    lru.move_to_end(e)
                    continue
                if len(lru) == S:
                    del lru[next(v for v in lru if v not in need)]
                lru[e] = True
    return hits


def optimal_hits(x, S):
    """Brute force over every eviction choice (tiny traces only): the most hits any demand policy can get."""
    N, L, K = x.shape
    total = 0
    for l in range(L):
        rows = [tuple(x[n, l].tolist()) for n in range(N)]

        @functools.lru_cache(maxsize=None)
        def best(n, resident):
            if n == N:
                return 0
            need = rows[n]
            hits = sum(e in resident for e in need)
            missing = [e for e in need if e not in resident]
            evictable = sorted(resident - set(need))
            n_evict = max(0, len(resident) + len(missing) - S)
            outcomes = []
            for drop in itertools.combinations(evictable, n_evict):
                outcomes.append(best(n + 1, frozenset((resident - set(drop)) | set(need))))
            return hits + max(outcomes)

        total += best(0, frozenset())
    return total


@settings(max_examples=80, deadline=None)
@given(traces())
def test_lru_matches_textbook_lru(trace):
    x, S = trace
    assert drive(x, S, "lru").hits == reference_lru_hits(x, S)


@settings(max_examples=80, deadline=None)
@given(traces())
def test_belady_is_never_beaten(trace):
    x, S = trace
    best = drive(x, S, Belady(x)).hits
    for name in ("lru", "lfu", "nocache"):
        assert drive(x, S, name).hits <= best, name


@settings(max_examples=40, deadline=None)
@given(traces(max_tokens=7))
def test_belady_equals_brute_force_optimum(trace):
    x, S = trace
    assert drive(x, S, Belady(x)).hits == optimal_hits(x, S)


@settings(max_examples=60, deadline=None)
@given(traces())
def test_belady_lookahead_spans_lru_to_belady(trace):
    """lookahead 0 knows nothing (exactly LRU); a lookahead past the trace is Belady; no lookahead beats Belady.
    (A partial oracle is not guaranteed to beat LRU, so that is not asserted.)"""
    x, S = trace
    N = len(x)
    assert drive(x, S, Belady(x, lookahead=0)).hits == drive(x, S, "lru").hits
    assert drive(x, S, Belady(x, lookahead=N)).hits == drive(x, S, Belady(x)).hits
    for k in (1, 2, 4):
        assert drive(x, S, Belady(x, lookahead=k)).hits <= drive(x, S, Belady(x)).hits


def test_belady_lookahead_argument_errors():
    with pytest.raises(ValueError, match="lookahead=-1 must be None"):
        Belady(lookahead=-1)
    assert Belady(lookahead=3).name == "belady-3"


@settings(max_examples=30, deadline=None)
@given(traces())
def test_nocache_always_misses(trace):
    x, S = trace
    cache = drive(x, S, "nocache")
    assert cache.hits == 0 and cache.demand_loads == cache.misses == x.size


def test_lfu_breaks_ties_by_recency():
    cache = ExpertCache(1, 6, 3, "lfu")
    for need in ([0, 1], [0, 2], [3]):  # counts: 0→2, 1→1, 2→1; 1 is older than 2, so 1 goes
        cache.begin_step()
        loads = cache.route(0, need)
        cache.end_step()
    assert loads == [Load(0, 3, 1, "demand", 1)]


def test_get_policy_registry():
    assert set(policy_names()) >= {"nocache", "lru", "lfu", "belady"}
    with pytest.raises(ValueError, match=r"unknown policy 'fifo'; valid names: belady, (\w+, )*lfu, lru, nocache"):
        get_policy("fifo")
    lru = get_policy("LRU")
    assert get_policy(lru) is lru
    with pytest.raises(TypeError, match="only apply when the policy is given by name"):
        get_policy(lru, future=None)
    with pytest.raises(ValueError, match="belady needs the future"):
        ExpertCache(1, 4, 2, "belady")


def test_pregate_is_engine_only():
    with pytest.raises(ValueError, match="needs the model's routers"):
        get_policy("pregate")
