"""Pictures of what the numbers say: a policy × budget sweep (hit rate, bytes and stall per token), and a
timeline of host→device copies against compute. matplotlib is an optional extra: `pip install 'ef-jax[plot]'`.

rows (dicts: policy, slots_per_layer, hit_rate, mb_per_token, stall_ms_per_token) → plot_sweep → PNG
timeline JSON (engine/telemetry/timeline.py, `--timeline`) → plot_timeline → PNG (copies and compute, one axis)

Drawn with the Agg backend (no display needed), one figure per call, closed after writing.
"""
from __future__ import annotations

import json
import os

EXTRA = "pip install 'ef-jax[plot]'"
SWEEP_METRICS = (("hit_rate", "hit rate"), ("mb_per_token", "MB/token host→device"),
                 ("stall_ms_per_token", "stall ms/token"))


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError naming the extra when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plots need matplotlib: {EXTRA} (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_output(path: str) -> str:
    """A .png path whose folder exists (checked before any work)."""
    if not path.lower().endswith(".png"):
        raise ValueError(f"--plot {path}: give a .png file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: folder {folder} does not exist")
    pyplot()  # the missing extra is reported before the work, not after it
    return path


def plot_sweep(rows: list[dict], path: str, title: str = "", x: str = "slots_per_layer",
               x_label: str = "expert slots per MoE layer") -> str:
    """One panel per metric the rows have (hit rate, MB/token, stall ms/token), one line per policy over `x`."""
    plt = pyplot()
    metrics = [(k, label) for k, label in SWEEP_METRICS if any(r.get(k) is not None for r in rows)]
    if not metrics:
        raise ValueError("nothing to plot: the rows hold no hit_rate, mb_per_token or stall_ms_per_token")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r[x], r[key]) for r in rows if r["policy"] == policy and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(timeline_path: str, path: str, max_events: int = 4000) -> str:
    """Compute (per layer group) and host→device copies of a `--timeline` JSON as bars on one time axis (ms)."""
    plt = pyplot()
    with open(timeline_path, encoding="utf-8") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"][:max_events]
    if not events:
        raise ValueError(f"{timeline_path} holds no timed events: write one with --timeline on an offloaded run")
    lanes = {0: ("compute", "tab:blue"), 1: ("host→device copies", "tab:orange")}
    fig, ax = plt.subplots(figsize=(10, 2.6))
    for tid, (name, color) in lanes.items():
        spans = [(e["ts"] / 1e3, max(e["dur"] / 1e3, 1e-3)) for e in events if e.get("tid") == tid]
        ax.broken_barh(spans, (tid * 10 + 1, 8), facecolors=color, edgecolor="none")
    stalls = [e for e in events if e["name"].lower().startswith("stall")]
    for e in stalls:
        ax.axvspan(e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3, color="tab:red", alpha=0.15, lw=0)
    ax.set_yticks([5, 15], [lanes[0][0], lanes[1][0]])
    ax.set_xlabel("ms since the run started")
    ax.set_title(f"{os.path.basename(timeline_path)}: {len(events)} events"
                 + (f", {len(stalls)} stalls (red)" if stalls else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
