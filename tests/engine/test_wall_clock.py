"""The wall clock's measurements for adaptive policies leave out intervals in which JAX compiled something (a new
shape's first call): compile time is neither a layer's compute nor a copy's duration."""
import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.cache.expert_cache import Load
from ef_jax.engine.transfer.clock import WallClock


class _Cache:
    """What the clock calls on an ExpertCache: the measurements and arrivals it reports are recorded."""
    def __init__(self):
        self.measured, self.arrived = [], []

    def measure(self, **kw):
        self.measured.append(kw)

    def arrive(self, layer, expert):
        self.arrived.append((layer, expert))


class _Copier:
    def __init__(self):
        self.done = []

    def wait(self, layer, experts, block=True):
        return []

    def poll(self):
        done, self.done = self.done, []
        return done


def _compile_something(n):
    jax.jit(lambda x: x * n + 1)(jnp.ones(3)).block_until_ready()  # a fresh function: traced and compiled


def test_layer_and_copy_times_skip_intervals_that_compiled():
    cache, copier = _Cache(), _Copier()
    clock = WallClock(cache)
    clock.wait(0, np.array([1]), copier)
    clock.routed(1)  # nothing compiled since layer 0's experts were ready: one layer of compute, measured
    assert [list(m) for m in cache.measured] == [["layer_compute_s"]] and cache.measured[0]["layer_compute_s"] >= 0
    clock.wait(1, np.array([2]), copier)
    _compile_something(2)
    clock.routed(2)  # this interval compiled a program: not a measurement
    assert len(cache.measured) == 1 and clock.unmeasured == 1

    clock.issued([Load(layer=3, expert=4, slot=0, evicted=-1, kind="demand")])
    _compile_something(3)
    copier.done = [(3, 4)]
    clock.poll(copier)  # the copy arrived, but a compile ran while it was in flight: its duration is not reported
    assert cache.arrived == [(3, 4)] and len(cache.measured) == 1 and clock.unmeasured == 2
    clock.issued([Load(layer=3, expert=5, slot=1, evicted=-1, kind="demand")])
    copier.done = [(3, 5)]
    clock.poll(copier)
    assert cache.arrived == [(3, 4), (3, 5)] and list(cache.measured[-1]) == ["copy_s"]
    assert clock.stats()["timings_skipped_for_compiles"] == 2
