"""Seconds JAX spends tracing, lowering and compiling, so first-call timings can be reported without them.

with CompileTimer() as ct: ... → ct.seconds (the sum of jax.monitoring's compile-phase durations while active)

JAX records a duration event for each top-level trace (`jaxpr_trace_duration`), each lowering to MLIR and each
XLA backend compile; nested jits are traced inside their caller's event, so the three never overlap and their
sum is the time the first call of a new shape spends before it computes anything.
"""
from __future__ import annotations

import threading

import jax.monitoring

COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class CompileTimer:
    """Context manager: `seconds` is the compile time (all threads) since __enter__; readable while active."""

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _listen(self, event: str, duration_s: float, **_metadata) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds += float(duration_s)

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
