"""Chrome/Perfetto trace events of an offloaded run: compute per layer (or per step), each host→device copy, each
stall, and counters drawn as graphs (the device step's per-step misses, prefetches and horizon)."""
from __future__ import annotations

import json
import time

TRACKS = {"compute": 0, "copy": 1}


class Timeline:
    """Complete ("X") events on two tracks and counter ("C") events; `write` produces a file chrome://tracing and
    ui.perfetto.dev open."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.perf_counter() if t0 is None else t0  # perf_counter seconds at ts 0
        self.events: list[dict] = []

    def add(self, name: str, track: str, t_start: float, t_end: float | None = None, args: dict | None = None) -> None:
        """A complete event from t_start to t_end (perf_counter seconds; None: now); args show when it is clicked."""
        t_end = time.perf_counter() if t_end is None else t_end
        event = {"name": name, "ph": "X", "pid": 0, "tid": TRACKS[track],
                 "ts": (t_start - self.t0) * 1e6, "dur": (t_end - t_start) * 1e6}
        if args:
            event["args"] = args
        self.events.append(event)

    def count(self, name: str, t: float, values: dict[str, float]) -> None:
        """A counter sample at t: each of `values` holds from t until the next sample of `name` (Perfetto draws one
        graph per name and key)."""
        self.events.append({"name": name, "ph": "C", "pid": 0, "ts": (t - self.t0) * 1e6, "args": dict(values)})

    def write(self, path: str) -> None:
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}}
                for name, tid in (("compute", 0), ("host→device copies", 1))]
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)


# the device step's per-step counters (DeviceStepExperts.per_step keys) drawn as graphs: graph → {series: key}
STEP_GRAPHS = {"misses": {"demand": "demand_misses", "late": "late"},
               "prefetches": {"issued": "prefetch_issued", "used": "prefetch_used", "wasted": "prefetch_wasted"}}


def add_steps(timeline: Timeline, starts: list[float], ends: list[float], tokens: list[int],
              per_step: dict[str, list]) -> None:
    """One compute event per step ("step n", args: its real tokens and every per_step value of that step) and
    counter samples: misses and prefetches at the step's start (they hold over the step), the horizon at its end
    (the horizon is the one in force after the step, so it holds from there)."""
    for n, (t, t_end) in enumerate(zip(starts, ends)):
        values = {k: v[n] for k, v in per_step.items()}
        timeline.add(f"step {n}", "compute", t, t_end, {"tokens": tokens[n], **values})
        for graph, series in STEP_GRAPHS.items():
            timeline.count(graph, t, {name: values[k] for name, k in series.items()})
        if "horizon" in values:
            timeline.count("horizon", t_end, {"layers": values["horizon"]})
