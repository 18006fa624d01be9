"""benchmarks/bench_sim.py from a clone: a missing trace is one line saying where to get it; a shipped trace runs."""
import json

from tests.bench_loader import load_benchmark


def test_missing_trace_is_one_line_with_where_to_get_it(tmp_path, capsys):
    bench = load_benchmark("bench_sim")
    assert bench.main(["--trace", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "ngavhane/moe-beyond" in err and "--trace benchmarks/data/default_model_kjv.npz" in err


def test_shipped_default_model_trace_runs(tmp_path, capsys):
    bench = load_benchmark("bench_sim")
    trace = str(bench.REPO / "benchmarks" / "data" / "default_model_kjv.npz")
    assert bench.main(["--trace", trace, "--tokens", "300", "--slots", "8", "--out", str(tmp_path / "r")]) == 0
    rec = json.load(open(tmp_path / "r.json"))
    assert rec["tokens"] == 300 and rec["model_shape"]["moe_layers"] == 10 and len(rec["results"]) == 4
    assert "README figures" not in open(tmp_path / "r.md").read()  # those belong to the DeepSeek trace only
