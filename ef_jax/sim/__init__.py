"""Trace-replay simulator: routing traces through ExpertCache + policies on a copy-stream/compute clock."""
from ef_jax.sim.replay import TIMING_PRESETS, ReplayStats, Timing, get_timing, replay
from ef_jax.trace import RoutingTrace, load_trace, make_trace, save_trace

__all__ = ["TIMING_PRESETS", "ReplayStats", "Timing", "get_timing", "replay", "RoutingTrace", "load_trace",
           "make_trace", "save_trace"]
