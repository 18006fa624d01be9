"""benchmarks/gpu_suite.py --dry-run: every part runs (tiny shapes, CPU) through the same parent/child machinery a
GPU run uses, and leaves a complete record — so the suite cannot rot between the rare runs on a lent GPU."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
# skipped rows a dry run may have: optional packages absent, or a copier this build does not have
ALLOWED_SKIPS = ("not importable", "not available in this build")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_suite"))
    env = dict(os.environ)  # one CPU device, as a GPU run has one GPU; the quick-compile flags stay (conftest.py)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", out], capture_output=True, text=True,
                          timeout=3600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def load(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        return json.load(f)


def test_every_part_leaves_a_complete_record(dry_run):
    from gpu_suite import PARTS
    out, log = dry_run
    for name in PARTS:
        rec = load(out, name)
        assert rec["part"] == name and rec["dry_run"] is True
        assert rec["status"] in ("ok", "partial"), (name, rec["status"], rec.get("log_tail", "")[-1500:])
        assert rec["errors"] == [], (name, rec["errors"])
        for s in rec["skipped"]:
            assert any(a in s["why"] for a in ALLOWED_SKIPS), (name, s)
        assert rec["meta"]["commit"] and os.path.exists(os.path.join(out, f"{name}.md"))
    summary = load(out, "summary")
    assert set(summary["status"]) == set(PARTS)


def test_parts_measured_what_they_name(dry_run):
    out, _ = dry_run
    tr = load(out, "transfer")
    assert tr["h2d_peak_gb_per_s"] > 0 and tr["hbm_gb_per_s"] > 0
    for variant in ("device_put_after_compute", "device_put_before_compute", "device_put_from_thread",
                    "in_program", "in_program_dynamic_slice"):
        assert "overlap_fraction" in tr["overlap"][variant], variant
    assert "copy_start" in tr["overlap"]["in_program"]["hlo"]
    ds = load(out, "deepseek")
    rows = ds["rows"]
    assert {r["policy"] for r in rows} == {"resident", "nocache", "lru", "expertflow", "predictive"}
    assert {r["batch"] for r in rows} == {1, 8} and {r["budget"] for r in rows} >= {0.25, 0.5, 1.0}
    lru = next(r for r in rows if (r["policy"], r["budget"], r["batch"]) == ("lru", 0.5, 1))
    device = {r["budget"]: r for r in rows if r.get("step") == "device"}  # issue 14's rows, beside the layer mode
    assert set(device) == {0.25} and all(r["host_syncs_per_step"] == 1.0 for r in device.values())  # dry: 25 % only
    assert {r["policy"] for r in rows if r.get("step") == "device"} == {"lru", "expertflow"}  # issue 26's rows
    assert all(r["device/layer"] > 0 for r in ds["device_step_ratios"])
    assert lru["roofline_tokens_per_s"] > 0 and lru["misses"] > 0 and 0 <= lru["hit_rate"] <= 1
    host = {r["host_compute"]: r for r in ds["host_compute_rows"]}  # issue 27's rows: lru 25 %, batch 1
    assert set(host) == {"never", "auto", "always"} and host["always"]["host_computed"] > 0
    assert all(r["roofline_host_tokens_per_s"] >= r["roofline_tokens_per_s"] for r in host.values())
    copiers = {r["transfers"] for r in load(out, "copiers")["rows"]}
    assert {"inline", "thread", "program"} <= copiers  # "program" measured, or marked not available
    quant = {r["expert_dtype"]: r for r in load(out, "quant")["rows"] if "expert_dtype" in r}
    assert set(quant) == {"f32", "int8", "int4"}  # dry runs in float32; a GPU run's float row is bf16
    assert len({r["expert_memory"] for r in quant.values()}) == 1  # the same budget for every dtype
    assert quant["int4"]["bytes_per_expert"] < quant["int8"]["bytes_per_expert"] < quant["f32"]["bytes_per_expert"]
    assert quant["f32"]["slots_per_layer"] < quant["int8"]["slots_per_layer"] <= quant["int4"]["slots_per_layer"]
    assert quant["int4"]["hit_rate"] >= quant["f32"]["hit_rate"] and quant["int4"]["auto"]["source"] == "cpu-default"
    assert {v["expert_dtype"] for v in load(out, "quant")["vs_float"]} == {"int8", "int4"}
    assert {r["policy"] for r in load(out, "mixtral")["rows"]} == {"resident", "lru"}  # dry: one offloaded row
    assert load(out, "policies")["rows"] and load(out, "expert_ffn")["rows"]
    hf = load(out, "hf_accelerate")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert hf["skipped"]
    else:
        assert "transformers resident" in {r["config"] for r in hf["rows"]}


def test_plan_runs_parts_in_suite_order_grouped_by_process():
    from gpu_suite import groups_to_run
    assert groups_to_run("copiers,transfer") == [("transfer", ["transfer"]), ("deepseek", ["copiers"])]
    assert ("deepseek", ["deepseek", "copiers", "quant"]) in groups_to_run(None)
    with pytest.raises(SystemExit):
        groups_to_run("transfer,nope")


def test_roofline_is_the_slower_of_compute_and_miss_copies():
    from suite_common import add_roofline
    # batch 2, 4 steps, 80 misses: 20 per step × 1 MB at 1 GB/s = 20 ms per step > 10 ms of compute
    row = {"tokens": 8, "steps": 4, "misses": 80, "tokens_per_s": 50.0, "h2d_bytes_real": 4 * 30 * 10**6}
    add_roofline(row, 0.010, 10**6, 1e9)
    assert row["roofline_step_s"] == pytest.approx(0.020)
    assert row["roofline_tokens_per_s"] == pytest.approx(100.0) and row["frac_of_roofline"] == pytest.approx(0.5)
    assert row["roofline_moved_tokens_per_s"] == pytest.approx(2 / 0.030)  # 30 MB really moved per step
    row = {"tokens": 8, "steps": 4, "misses": 4, "tokens_per_s": 50.0}
    add_roofline(row, 0.010, 10**6, 1e9)  # 1 ms of copies per step: compute-bound
    assert row["roofline_tokens_per_s"] == pytest.approx(200.0)
