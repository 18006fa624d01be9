"""ExpertCache: refusing to evict a needed expert, require's errors, multi-pass layers, prefetch used / wasted /
late accounting and pins, the read-only view (moved from tests/policies: they test the cache, not a policy)."""
import pytest

from ef_jax.cache import ExpertCache
from ef_jax.policies import BasePolicy


class Adversary(BasePolicy):
    """Always names the first resident expert, needed or not: the cache must refuse."""
    name = "adversary"

    def victim(self, layer, candidates, view):
        return int(view.resident(layer)[0])


def test_cache_refuses_to_evict_a_needed_expert():
    cache = ExpertCache(1, 8, 2, Adversary())
    cache.begin_step()
    cache.route(0, [0, 1])
    cache.end_step()
    cache.begin_step()
    with pytest.raises(RuntimeError, match=r"chose victim 0 .* evictable experts are \[1\]"):
        cache.route(0, [0, 5])


def test_require_errors():
    cache = ExpertCache(2, 8, 2, "lru")
    with pytest.raises(ValueError, match="begin_step"):
        cache.require(0, [1])
    cache.begin_step()
    with pytest.raises(ValueError, match="3 experts needed at layer 0 but only 2 slots"):
        cache.require(0, [1, 2, 3])
    with pytest.raises(ValueError, match="unique"):
        cache.require(0, [1, 1])
    cache.require(1, [1])
    with pytest.raises(ValueError, match="increasing order"):
        cache.require(0, [1])


def test_multi_pass_layer():
    cache = ExpertCache(1, 8, 2, "lru", check=True)
    cache.begin_step()
    cache.require(0, [0, 1])
    with pytest.raises(ValueError, match=r"release\(0\)"):
        cache.require(0, [2, 3])
    cache.release(0)
    loads = cache.require(0, [2, 3])
    assert sorted(ld.evicted for ld in loads) == [0, 1]
    assert cache.view.routed(0, 0).tolist() == [0, 1, 2, 3]


class Scripted(BasePolicy):
    """Prefetches whatever `plan[(step, layer)]` says after that layer routes; evicts the lowest id."""
    name = "scripted"

    def __init__(self, plan, at_end=()):
        self.plan, self.at_end = plan, at_end

    def on_route(self, layer, experts, view):
        return self.plan.get((view.step, layer), [])

    def on_step_end(self, step, view):
        return list(self.at_end)

    def victim(self, layer, candidates, view):
        return min(candidates)


def test_prefetch_used_wasted_late_and_pins():
    plan = {(0, 0): [(1, 4), (1, 5), (0, 6)], (1, 0): [(0, 2)]}
    cache = ExpertCache(2, 8, 2, Scripted(plan), check=True)
    cache.begin_step()
    loads = cache.route(0, [0, 1])  # 2 demand; the (0, 6) prefetch finds both slots pinned: dropped
    assert [(ld.kind, ld.layer, ld.expert) for ld in loads] == [
        ("demand", 0, 0), ("demand", 0, 1), ("prefetch", 1, 4), ("prefetch", 1, 5)]
    assert cache.prefetch_dropped == 1
    for ld in loads[:2]:
        cache.arrive(ld.layer, ld.expert)
    cache.arrive(1, 4)  # 5 is still in flight when layer 1 routes
    cache.release(0)
    assert cache.route(1, [4, 5]) == []
    assert (cache.hits, cache.late, cache.prefetch_used) == (1, 1, 2)
    cache.end_step()
    cache.begin_step()
    # step 1, layer 0 needs [0, 3]: 1 is evicted; the (0, 2) prefetch must not evict pinned 0 or 3: dropped
    loads = cache.route(0, [0, 3])
    assert [(ld.kind, ld.expert, ld.evicted) for ld in loads] == [("demand", 3, 1)]
    assert cache.prefetch_dropped == 2
    cache.release(0)
    assert [ld.evicted for ld in cache.prefetch(0, [2])] == [0]  # released: now evictable
    assert cache.prefetch(0, [3]) == []  # already resident: skipped
    cache.release(1)
    cache.prefetch(1, [6, 7])  # evicts prefetched-and-used 4 and 5: not wasted
    assert cache.prefetch_wasted == 0
    cache.prefetch(1, [0])  # evicts prefetched, never used 6
    assert cache.prefetch_wasted == 1
    s = cache.stats()
    assert s["prefetch_issued"] == 6 and s["loads"] == 3 + 6


def test_view_history_and_flags():
    cache = ExpertCache(3, 8, 4, "lru")
    cache.begin_step()
    cache.route(0, [3, 1])
    cache.route(2, [5])  # layer 1 skipped (e.g. a dense layer): its history entry is empty
    v = cache.view
    assert (v.step, v.layer) == (0, 2)
    assert v.routed(0, 0).tolist() == [3, 1] and v.routed(0, 1).tolist() == [] and v.routed(0, 2).tolist() == [5]
    assert v.routed(1, 0) is None
    assert v.is_resident(0, 3) and not v.is_arrived(0, 3) and v.pinned(2) == {5}
    cache.arrive_all()
    assert v.is_arrived(0, 1)
    cache.end_step()
    assert v.pinned(2) == frozenset()
    cache.begin_step()
    assert v.routed(0, 2).tolist() == [5]
