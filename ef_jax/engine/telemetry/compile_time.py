"""Seconds JAX spends tracing, lowering and compiling, so first-call timings can be reported without them.

with CompileTimer() as ct: ... → ct.seconds (the sum of jax.monitoring's compile-phase durations while active)
compile_seconds() → the process's compile time so far: an interval whose two readings differ compiled something
  (the wall clock leaves such intervals out of the compute and copy times it reports to adaptive policies)

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
        self.registered = False
        self._lock = threading.Lock()

    def _listen(self, event: str, duration_s: float, **_metadata) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds += float(duration_s)

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        self.registered = True
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
        self.registered = False


_TOTAL = CompileTimer()  # every compile of the process, from the first compile_seconds() call on


def compile_seconds() -> float:
    """Compile seconds of this process since the first call (a monotonic counter: compare two readings)."""
    if not _TOTAL.registered:
        _TOTAL.__enter__()
    return _TOTAL.seconds
