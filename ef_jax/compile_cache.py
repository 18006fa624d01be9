"""The command line's persistent XLA compilation cache: a second `ef-jax generate` loads its programs from disk
instead of compiling them again (on the shipped model, compiling is most of the time to the first token).

ef-jax [--no-compile-cache] CMD → enable() → jax_compilation_cache_dir = $EF_JAX_CACHE_DIR/jit
                                             (default ~/.cache/ef_jax/jit, under $XDG_CACHE_HOME when set)

A cache the environment already chose (JAX_COMPILATION_CACHE_DIR, as the test suite sets, or jax's config) is
left as it is. The Python API does not turn the cache on: a library should not write to a user's home unasked
(call enable() to opt in).
"""
from __future__ import annotations

import os

ENV = "EF_JAX_CACHE_DIR"
FLAG = "--no-compile-cache"


def cache_root() -> str:
    """ef_jax's per-user cache folder: $EF_JAX_CACHE_DIR, else $XDG_CACHE_HOME/ef_jax, else ~/.cache/ef_jax."""
    if os.environ.get(ENV):
        return os.path.expanduser(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ef_jax")


def enable() -> str | None:
    """Points jax's persistent compilation cache at cache_root()/jit; returns the folder in use (None: off because
    it could not be made). An already configured cache wins and is returned."""
    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    path = os.path.join(cache_root(), "jit")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail the command
    jax.config.update("jax_compilation_cache_dir", path)
    # every program, however quick to compile: a CLI run compiles dozens of small ones and their sum is seconds
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def pop_flag(argv: list[str]) -> tuple[list[str], bool]:
    """(argv without --no-compile-cache, whether it was there): the flag is accepted before or after the command."""
    return [a for a in argv if a != FLAG], FLAG in argv
