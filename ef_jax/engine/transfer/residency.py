"""The residency cache: what the engine builds once per model and keeps while the model lives.

(model, part) → the built object. Parts: "store:pinned" / "store:mapped" (the ExpertStore: the one host copy of the
experts, shared by the layer mode and the device step), "resident" (every expert on the device), "mesh_resident",
"mesh_stores" (per mesh device), "context" (the PolicyContext's host tables). A Model is plain data and never
changes; what running it costs in memory lives here, and `drop(model, part)` frees it (a benchmark switching modes,
a caller done with a mode).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()  # a server's threads may build the same part at once: build it once


def cached(model, part: str, build: Callable[[], Any]):
    """The model's `part`, built by `build()` on first use."""
    with _LOCK:
        parts = _CACHE.setdefault(model, {})
        if part not in parts:
            parts[part] = build()
        return parts[part]


def peek(model, part: str):
    """The model's `part` if it was built, else None (builds nothing)."""
    with _LOCK:
        return _CACHE.get(model, {}).get(part)


def drop(model, part: str | None = None) -> None:
    """Frees the model's `part` ("store" drops both store kinds), or every part when None."""
    with _LOCK:
        parts = _CACHE.get(model)
        if parts is None:
            return
        if part is None:
            parts.clear()
            return
        for key in [k for k in parts if k == part or k.split(":")[0] == part]:
            del parts[key]
