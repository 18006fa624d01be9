"""Guard rails: every `ef-jax` refusal comes before any model work, as one line naming the flag and the fix.

Each case runs the CLI in-process with the work itself (ef_jax.load, trace loading, training) replaced by a
function that fails the test: a refusal that only came after loading the model or reading the trace would hit it.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ef_jax
from ef_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACE = os.path.join(REPO, "benchmarks", "data", "default_model_kjv.npz")


class ModelWork(AssertionError):
    pass


def _boom(*a, **k):
    raise ModelWork("model work started before the refusal")


@pytest.fixture
def no_model_work(monkeypatch):
    import ef_jax.hybrid.record
    import ef_jax.cli.predict
    import ef_jax.predict.runtime
    import ef_jax.cli.sim
    monkeypatch.setattr(ef_jax, "load", _boom)
    monkeypatch.setattr(ef_jax, "generate", _boom)
    monkeypatch.setattr(ef_jax.cli.sim, "load_trace", _boom)
    monkeypatch.setattr(ef_jax.cli.sim, "replay", _boom)
    monkeypatch.setattr(ef_jax.cli.predict, "load_trace", _boom)
    monkeypatch.setattr(ef_jax.predict.runtime.TrainedPredictor, "load", _boom)
    monkeypatch.setattr(sys.modules["ef_jax.hybrid.record"].Record, "load", _boom)  # the package shadows the name


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    return {"TEXT": str(text), "LATIN1": str(latin1), "FILE": str(a_file), "DIR": str(empty),
            "OUT": str(tmp_path / "out.npz"), "OUTDIR": str(tmp_path / "outdir"), "TRACE": TRACE,
            "LONG": "the " * 5142}


# (argv with placeholders, words the one-line message must contain)
CASES = [
    (["generate", "x", "--slots-per-layer", "0"], ["--slots-per-layer 0", "--slots-per-layer 4"]),
    (["generate", "x", "--slots-per-layer", "2"], ["--slots-per-layer 2", "--policy resident"]),
    (["generate", "x", "--step", "device"], ["--step device", "--slots-per-layer"]),
    (["generate", "x", "--slots-per-layer", "8", "--policy", "expertflow", "--hybrid", "d", "--step", "device",
      "--devices", "2"], ["--hybrid", "--devices 2", "one device only"]),
    (["generate", "x", "--devices", "64"], ["--devices 64", "has 4 devices", "device_count=64"]),
    (["generate", "x", "--devices", "0"], ["--devices 0", "≥ 1"]),
    (["generate", "x", "--devices", "2", "--slots-per-layer", "8", "--policy", "expertflow"],
     ["--devices 2", "lru, lfu, nocache"]),
    (["generate", "x", "--devices", "2", "--expert-memory", "auto"], ["--devices 2", "auto"]),
    (["serve", "--devices", "64"], ["--devices 64", "has 4 devices"]),
    (["generate", "x", "--max-new-tokens", "2000"], ["--max-new-tokens 2000", "max_position_embeddings=1024",
                                                     "at most"]),
    (["generate", "x", "--max-new-tokens", "100000000"], ["--max-new-tokens", "max_position_embeddings"]),
    (["generate", "LONG"], ["max_position_embeddings=1024", "shorten the prompt"]),
    (["generate", "x", "--max-new-tokens", "0"], ["--max-new-tokens 0", "≥ 1"]),
    (["generate", "x", "--max-new-tokens", "abc"], ["--max-new-tokens", "invalid int"]),
    (["generate", "x", "--temperature", "-1"], ["--temperature", "≥ 0"]),
    (["generate", "x", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["generate", "x", "--top-k", "-2"], ["--top-k"]),
    (["generate", "x", "--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["generate", "x", "--slots-per-layer", "8", "--timeline", "/nonexistent/x.json"],
     ["--timeline", "does not exist"]),
    (["generate", "x", "--slots-per-layer", "8", "--timeline", "DIR"], ["--timeline", "is a directory"]),
    (["generate", "x", "--timeline", "OUT"], ["--timeline", "--expert-memory"]),
    (["generate", "x", "--slots-per-layer", "8", "--policy", "belady"], ["--policy belady", "ef-jax sim"]),
    (["generate", "x", "--slots-per-layer", "8", "--policy", "fifo"], ["--policy fifo", "resident"]),
    (["generate", "x", "--policy", "lru"], ["--policy lru", "--expert-memory", "--slots-per-layer"]),
    (["generate", "x", "--policy", "resident", "--slots-per-layer", "8"], ["--policy resident"]),
    (["generate", "x", "--expert-memory", "1KiB"], ["--expert-memory 1KiB", "too small", "or more"]),
    (["generate", "x", "--expert-memory", "lots"], ["--expert-memory", "not a size"]),
    (["generate", "x", "--expert-memory", "0"], ["--expert-memory 0", "--policy resident"]),
    (["generate", "x", "--slots-per-layer", "8", "--expert-memory", "2GiB"], ["--expert-memory", "not allowed"]),
    (["generate", "x", "--predictor", "DIR"], ["--predictor", "--policy predictive"]),
    (["generate", "x", "--slots-per-layer", "8", "--policy", "predictive", "--predictor", "DIR"],
     ["--predictor", "config.json"]),
    (["generate", "x", "--slots-per-layer", "8", "--policy", "expertflow", "--hybrid", "FILE"],
     ["--hybrid", "directory"]),
    (["generate", "--prompt-file", "LATIN1"], ["--prompt-file", "not UTF-8"]),
    (["generate", "--prompt-file", "/nonexistent.txt"], ["--prompt-file", "no such file"]),
    (["generate", "x", "--prompt-ids", "1 2"], ["exactly one of PROMPT"]),
    (["generate"], ["exactly one of PROMPT"]),
    (["generate", "--prompt-ids", "1 99999"], ["--prompt-ids", "vocabulary"]),
    (["generate", "--prompt-ids", "1 x"], ["--prompt-ids", "token ids"]),
    (["generate", "x", "--model", "/nonexistent"], ["--model /nonexistent", "checkpoint directory"]),
    (["generate", "x", "--model", "DIR"], ["--model", "config.json"]),
    (["info", "/nonexistent"], ["/nonexistent", "not a directory"]),
    (["trace", "--text", "DIR", "--out", "OUT"], ["--text", "is a directory"]),
    (["trace", "--text", "TEXT", "--out", "/nonexistent/dir/t.npz"], ["--out", "does not exist"]),
    (["trace", "--text", "TEXT", "--out", "DIR"], ["--out", "is a directory"]),
    (["trace", "--text", "LATIN1", "--out", "OUT"], ["--text", "not UTF-8"]),
    (["trace", "--text", "TEXT", "--out", "OUT", "--max-tokens", "0"], ["--max-tokens 0"]),
    (["sim", "TEXT", "--slots-per-layer", "4"], ["TRACE", "not an .npz"]),
    (["sim", "TRACE", "--slots-per-layer", "0"], ["--slots-per-layer 0"]),
    (["sim", "TRACE", "--slots-per-layer", "4", "--policy", "pregate"], ["--policy", "invalid choice"]),
    (["sim", "TRACE", "--slots-per-layer", "4", "--timing", "none", "--expert-bytes", "10"], ["--expert-bytes"]),
    (["eval-policy", "--text", "TEXT", "--policy", "lru"], ["--expert-memory", "--slots-per-layer"]),
    (["eval-policy", "--text", "TEXT", "--slots-per-layer", "0"], ["--slots-per-layer 0"]),
    (["eval-policy", "--text", "LATIN1", "--slots-per-layer", "8"], ["--text", "not UTF-8"]),
    (["eval-policy", "--text", "TEXT", "--slots-per-layer", "8", "--hybrid", "DIR"], ["--hybrid", "config.json"]),
    (["eval-policy", "--text", "TEXT", "--policy", "resident", "--slots-per-layer", "8"], ["--policy resident"]),
    (["record", "--text", "TEXT", "--out", "/nonexistent/r.npz"], ["--out", "does not exist"]),
    (["train-hybrid", "TEXT", "--out", "OUTDIR"], ["RECORD", "not an .npz", "ef-jax record"]),
    (["train-hybrid", "TRACE", "--out", "FILE"], ["--out", "is a file"]),
    (["train-predictor", "TEXT", "--out", "OUTDIR"], ["TRACE.npz", "not an .npz"]),
    (["train-predictor", "TRACE", "--out", "FILE"], ["--out", "is a file"]),
    (["eval-predictor", "DIR", "TRACE"], ["DIR", "config.json"]),
]

# every support-table row a flag can reach (ef_jax.cache.support; the API's side: tests/cache/test_support.py),
# through each command that decodes
G, S8 = ["generate", "x"], ["--slots-per-layer", "8"]
EP = ["eval-policy", "--text", "TEXT"]
SUPPORT_CASES = [
    (G + S8 + ["--policy", "predictive"], ["--policy predictive", "--predictor DIR"]),
    (G + S8 + ["--policy", "belady"], ["offline oracle", "ef-jax sim TRACE --policy belady"]),
    (G + ["--predictor", "DIR"], ["--predictor is the predictor", "--policy predictive"]),
    (G + ["--hybrid", "DIR"], ["--hybrid is the predictor", "--policy expertflow"]),
    (G + ["--timeline", "OUT"], ["--timeline records the offload engine"]),
    (EP + S8 + ["--step", "device", "--timing", "h100"], ["--timing", "--step layer"]),
    (EP + ["--step", "device", "--policy", "resident"], ["--step device", "--slots-per-layer"]),
    (EP + ["--devices", "64", "--policy", "resident"], ["--devices 64", "has 4 devices"]),
    (EP + ["--devices", "2"] + S8 + ["--policy", "expertflow"], ["--devices 2", "--policy expertflow"]),
    (EP + ["--devices", "2"] + S8 + ["--policy", "lru", "--routing", "cache-aware"], ["--devices 2", "--routing exact"]),
    (EP + ["--devices", "2"] + S8 + ["--policy", "lru", "--timing", "h100"], ["--devices 2", "--timing"]),
    (EP + ["--devices", "2"] + S8 + ["--policy", "lru", "--step", "device", "--routing", "cache-aware"],
     ["--devices 2", "--routing exact"]),
    (G + ["--devices", "2"] + S8 + ["--timeline", "OUT"], ["--devices 2", "--timeline"]),
    (["serve", "--step", "device"], ["--step device", "--slots-per-layer"]),
    (["serve", "--devices", "2", "--expert-memory", "auto"], ["--devices 2", "--expert-memory auto"]),
    # the kernel's row on a CPU (the tests' platform), through every command that decodes
    (G + ["--expert-kernel", "pallas"], ["--expert-kernel pallas", "platform is cpu", "--expert-kernel xla"]),
    (EP + ["--expert-kernel", "pallas", "--policy", "resident"], ["--expert-kernel pallas", "--expert-kernel xla"]),
    (["serve", "--expert-kernel", "pallas"], ["--expert-kernel pallas", "--expert-kernel xla"]),
    (["bench", "--expert-kernel", "pallas"], ["--expert-kernel pallas", "--expert-kernel xla"]),
    (["record", "--text", "TEXT", "--out", "OUT", "--expert-kernel", "pallas"], ["--expert-kernel pallas"]),
]
CASES += SUPPORT_CASES


def _fill(argv, files):
    return [files.get(a, a) for a in argv]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_refused_before_any_model_work(argv, words, files, no_model_work, capsys):
    try:
        rc = cli.main(_fill(argv, files))
    except SystemExit as e:  # argparse's own refusals (bad int, invalid choice) exit from parse_args
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err                       # one line, no usage block, no traceback
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    for python_name in ("expert_memory=", "slots_per_layer=", "max_new_tokens="):
        assert python_name not in lines[0]            # flags, not Python argument names


def test_refusal_from_the_real_entry_point_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ef_jax.cli", "generate", "x", "--slots-per-layer", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "--slots-per-layer 0" in r.stderr


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ef-jax {ef_jax.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default: 0)" in help_text                                   # --seed
    assert "generation_config.json, else 64" in help_text               # --max-new-tokens
    assert "belady" not in help_text and "resident" in help_text        # --policy offers what generate can run
    for flag in ("--prompt-file", "--prompt-ids", "--json", "--stop", "--repetition-penalty", "--predictor",
                 "--hybrid"):
        assert flag in help_text


def test_sim_help_lists_only_policies_sim_runs(capsys):
    from ef_jax.cli import sim as sim_cli
    names = sim_cli.sim_policies()
    assert set(names) == {"nocache", "lru", "lfu", "belady"}
    for name in names:  # each one listed really runs
        assert cli.main(["sim", TRACE, "--slots-per-layer", "8", "--policy", name, "--tokens", "50"]) == 0
    capsys.readouterr()


def test_empty_trace_file_guard_reports_numpy_free_message(tmp_path, capsys):
    # an .npz that is a zip but not a trace still fails with one line (load_trace's own message), exit 2
    p = tmp_path / "other.npz"
    np.savez(p, a=np.zeros(3))
    assert cli.main(["sim", str(p), "--slots-per-layer", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_quantized_checkpoint_refused_in_one_line(tiny_checkpoint, tmp_path, no_model_work, capsys):
    import json
    import shutil
    d = str(tmp_path / "fp8")
    shutil.copytree(tiny_checkpoint("qwen3moe-norm"), d)
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"] = {"quant_method": "fp8"}
    json.dump(cfg, open(p, "w"))
    capsys.readouterr()  # building the tiny checkpoint prints a progress bar
    assert cli.main(["generate", "--model", d, "--prompt-ids", "1 2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "quant_method='fp8'" in err and "Traceback" not in err
