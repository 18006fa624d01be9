"""Pictures: `ef-jax sim --plot` and `eval-policy --plot` write PNGs of stall / bytes / hit rate per policy and
budget, `plot-timeline` draws a --timeline JSON; without matplotlib the error names the extra, before any work."""
import json
import sys

import numpy as np
import pytest

from ef_jax.cli.commands import main

pytest.importorskip("matplotlib")


def _png_ok(path) -> None:
    import matplotlib.image
    img = matplotlib.image.imread(str(path))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # opens, has size, is not blank


@pytest.fixture
def trace(tmp_path):
    from ef_jax.trace import save_trace
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(16, size=(4, 2), replace=False) for _ in range(200)]).astype(np.uint8)  # [N, L, K]
    path = tmp_path / "t.npz"
    save_trace(path, experts)
    return str(path)


def test_sim_plot_writes_a_png(trace, tmp_path, capsys):
    png = tmp_path / "sim.png"
    assert main(["sim", trace, "--slots-per-layer", "4", "--plot", str(png)]) == 0
    _png_ok(png)


def test_eval_policy_plot_accumulates_runs(tiny_checkpoint, tmp_path, capsys):
    d = tiny_checkpoint("qwen3moe-norm")
    text = tmp_path / "ids.txt"
    text.write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 96, 60))))
    png = tmp_path / "policies.png"
    for slots in ("4", "6"):
        assert main(["eval-policy", "--model", d, "--text", str(text), "--slots-per-layer", slots, "--policy", "lru",
                     "--timing", "h100", "--max-tokens", "30", "--seq-len", "30", "--plot", str(png)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "policies.jsonl")]
    assert [r["slots_per_layer"] for r in rows] == [4, 6] and all(r["stall_ms_per_token"] >= 0 for r in rows)
    _png_ok(png)


def test_plot_timeline(tmp_path, capsys):
    from ef_jax.engine.telemetry.timeline import Timeline
    tl = Timeline()
    for i in range(5):
        tl.add(f"experts L{i}", "compute", tl.t0 + i * 1e-3, tl.t0 + i * 1e-3 + 5e-4)
        tl.add(f"H2D L{i}", "copy", tl.t0 + i * 1e-3 + 2e-4, tl.t0 + i * 1e-3 + 9e-4)
    tl.write(str(tmp_path / "tl.json"))
    assert main(["plot-timeline", str(tmp_path / "tl.json"), "--out", str(tmp_path / "tl.png")]) == 0
    _png_ok(tmp_path / "tl.png")


def test_plot_timeline_of_device_steps(tmp_path, capsys):
    """A step="device" timeline (one event per step with its counters as args, and counter events): drawn from its
    step events, the counter events left out."""
    from ef_jax.engine.telemetry.timeline import Timeline, add_steps
    tl = Timeline()
    starts = [tl.t0 + n * 2e-3 for n in range(6)]
    per = {k: [n % 3 for n in range(6)] for k in ("demand_misses", "prefetch_issued", "prefetch_used",
                                                  "prefetch_wasted", "late", "horizon", "h2d_bytes")}
    add_steps(tl, starts, [t + 1.5e-3 for t in starts], [4] + [1] * 5, per)
    tl.write(str(tmp_path / "steps.json"))
    assert {e["ph"] for e in json.load(open(tmp_path / "steps.json"))["traceEvents"]} == {"M", "X", "C"}
    assert main(["plot-timeline", str(tmp_path / "steps.json"), "--out", str(tmp_path / "steps.png")]) == 0
    _png_ok(tmp_path / "steps.png")


def test_without_matplotlib_the_error_names_the_extra(trace, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["sim", trace, "--slots-per-layer", "4", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ef-jax[plot]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
