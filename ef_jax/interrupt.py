"""Ctrl-C before `ef-jax generate` has anything to keep (importing, loading, compiling, prefilling): exit 130 at
once, with what was printed flushed, instead of raising KeyboardInterrupt.

A KeyboardInterrupt raised while JAX compiles lands in whatever Python code runs then — jax's lowering, a
callback XLA's compile threads call — and unwinding through that half-built state crashed the interpreter
(`Fatal Python error: Segmentation fault`, exit -11, in 4 of 16 tries at 4.0-4.2 s). Leaving by os._exit runs no
unwinding and no interpreter teardown while those threads still work: nothing half-done is finalized.

exit_on_sigint(message) → SIGINT: flush stdout, one line on stderr, os._exit(130)
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def exit_now(message: str) -> None:
    """Flushes what was printed, writes `message` to stderr and ends the process with status 130."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass
    os._exit(130)


def exit_on_sigint(message: str):
    """Installs the exit-at-once handler (main thread only); returns the previous handler, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: exit_now(message))
