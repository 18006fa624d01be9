"""Chrome/Perfetto trace events of an offloaded run: compute per layer, each host→device copy, each stall."""
from __future__ import annotations

import json
import time

TRACKS = {"compute": 0, "copy": 1}


class Timeline:
    """Complete ("X") events on two tracks; `write` produces a file chrome://tracing and ui.perfetto.dev open."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []

    def add(self, name: str, track: str, t_start: float, t_end: float | None = None) -> None:
        t_end = time.perf_counter() if t_end is None else t_end
        self.events.append({"name": name, "ph": "X", "pid": 0, "tid": TRACKS[track],
                            "ts": (t_start - self.t0) * 1e6, "dur": (t_end - t_start) * 1e6})

    def write(self, path: str) -> None:
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}}
                for name, tid in (("compute", 0), ("host→device copies", 1))]
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)
