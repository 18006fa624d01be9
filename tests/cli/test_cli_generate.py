"""`ef-jax generate` as a user runs it: streamed text, Ctrl-C keeps it (exit 130), --json, --stop, prompts from a
file / stdin / token ids, honest stats labels; `trace` reports the file it wrote; no PyTorch advice on stderr."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ef_jax
from ef_jax import cli
from ef_jax.cli.stream import TextStream

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def default_model():
    return ef_jax.load()


def _greedy_text(model, prompt: str, n: int) -> tuple[str, list[int]]:
    ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    toks = ef_jax.generate(model, [ids], max_new_tokens=n).tokens[0]
    return model.tokenizer.decode(list(ids) + toks, skip_special_tokens=True), toks


# ---- Ctrl-C (item 5) --------------------------------------------------------------------------------------------
def test_ctrl_c_keeps_the_streamed_text_and_exits_130(default_model):
    proc = subprocess.Popen([sys.executable, "-m", "ef_jax.cli", "generate", "To be, or not", "--max-new-tokens",
                             "1000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(1 << 16), b"")))
    reader.start()
    deadline = time.time() + 240
    # wait until generated text (beyond the echoed prompt) has streamed out, while the process still runs
    while len(b"".join(chunks)) < len("To be, or not") + 20:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no streamed output"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    reader.join(timeout=10)
    err = proc.stderr.read().decode()
    out = b"".join(chunks).decode()
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    n = int(err.split("interrupted after ")[1].split()[0])
    assert 1 <= n < 1000
    want, _ = _greedy_text(default_model, "To be, or not", n)
    assert out == want + "\n"  # exactly the n tokens generated, as one would have seen them


def test_streams_through_on_token_and_matches_the_api(default_model, capsys, monkeypatch):
    want, toks = _greedy_text(default_model, "To be, or not", 12)
    calls = []
    real = ef_jax.generate

    def spy(*a, **k):
        on_token = k["on_token"]

        def wrapped(row, tok):
            calls.append(capsys.readouterr().out)  # what was on stdout before this token's text
            return on_token(row, tok)
        return real(*a, **dict(k, on_token=wrapped))
    monkeypatch.setattr(ef_jax, "generate", spy)
    assert cli.main(["generate", "To be, or not", "--max-new-tokens", "12"]) == 0
    rest = capsys.readouterr()
    out = "".join(calls) + rest.out
    assert out == want + "\n"
    assert calls[0] == "To be, or not" and len(calls) == len(toks)   # prompt first, then text token by token
    assert sum(1 for c in calls if c) > 3                               # printed while generating, not at the end
    assert "compile" in rest.err and "prefill" in rest.err and "12 tokens" in rest.err


# ---- flags (items 11, 15) ---------------------------------------------------------------------------------------
def test_json_output(default_model, capsys):
    assert cli.main(["generate", "To be, or not", "--max-new-tokens", "6", "--json"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    want, toks = _greedy_text(default_model, "To be, or not", 6)
    assert rec["tokens"] == toks and rec["prompt"] + rec["text"] == want and rec["interrupted"] is False
    assert rec["stats"]["generated_tokens"] == 6 and "compile_s" in rec["stats"]
    assert err == ""


def test_prompt_from_file_and_stdin_equals_the_argument(tmp_path, capsys, monkeypatch):
    assert cli.main(["generate", "To be, or not", "--max-new-tokens", "5"]) == 0
    want = capsys.readouterr().out
    p = tmp_path / "prompt.txt"
    p.write_text("To be, or not")
    assert cli.main(["generate", "--prompt-file", str(p), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want
    # stdin in-process (a subprocess would re-import jax, torch and transformers for the same code path); the
    # real entry point's streaming runs in a subprocess in the Ctrl-C test
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be, or not"))
    assert cli.main(["generate", "-", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want


def test_stop_string_ends_the_output_before_it(default_model, capsys):
    want, _ = _greedy_text(default_model, "To be, or not", 40)
    cont = want[len("To be, or not"):]
    stop = cont[8:12]  # a string the greedy continuation contains
    assert cli.main(["generate", "To be, or not", "--max-new-tokens", "40", "--stop", stop]) == 0
    out, err = capsys.readouterr()
    assert out == "To be, or not" + cont[:cont.index(stop)] + "\n"
    assert "40 tokens" not in err                                       # generation ended at the stop string


def test_token_id_prompt_for_a_checkpoint_without_tokenizer(tiny_checkpoint, capsys):
    d = tiny_checkpoint("qwen3moe-norm")
    model = ef_jax.load(d)
    toks = ef_jax.generate(model, [[3, 4, 5]], max_new_tokens=4).tokens[0]
    assert cli.main(["generate", "--model", d, "--prompt-ids", "3 4 5", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.split() == ["3", "4", "5"] + [str(t) for t in toks]


def test_policy_resident_and_labelled_offload_stats(capsys):
    assert cli.main(["generate", "To be", "--policy", "resident", "--max-new-tokens", "3"]) == 0
    assert "hit rate" not in capsys.readouterr().err
    assert cli.main(["generate", "To be", "--slots-per-layer", "8", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "H2D" in err and " total" in err and "ms total (" in err and "ms/token" in err
    assert "1 slots" not in err and "1 misses" not in err


def test_step_device_prints_the_resident_text(tiny_checkpoint, capsys, tmp_path):
    # a tiny checkpoint: the flag's plumbing is the same for every model, and a device step of the shipped model
    # (10 layers × 32 experts in one program) costs minutes to compile on a CI CPU. The prompt, budget and length
    # of test_device_step's mixtral-top2 case: the same programs, so one of the two finds them in the run's cache.
    # --timeline writes one event per step (the prefill and 3 decode steps; its contents: test_device_step)
    d = tiny_checkpoint("mixtral-top2")
    argv = ["generate", "--model", d, "--prompt-ids", "5 17 33 2 70 41 9", "--max-new-tokens", "4"]
    timeline = tmp_path / "steps.json"
    assert cli.main(argv + ["--slots-per-layer", "2", "--step", "device", "--timeline", str(timeline)]) == 0
    got = capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == got.out and "hit rate" in got.err   # the cache in the step changes no token
    steps = [e for e in json.load(open(timeline))["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in steps] == [f"step {n}" for n in range(4)] and "demand_misses" in steps[0]["args"]


def test_devices_split_the_experts_and_keep_the_text(tiny_checkpoint, capsys):
    """--devices 2 (two of the four host devices tests/conftest.py makes), offloaded in the layer mode and in the
    device step: the same tokens as one device, the stats per device (resident meshes: tests/test_mesh.py)."""
    argv = ["generate", "--model", tiny_checkpoint("qwen3moe-norm"), "--prompt-ids", "3 4 5", "--max-new-tokens", "4"]
    assert cli.main(argv) == 0
    one = capsys.readouterr().out
    for step in ("layer", "device"):
        assert cli.main(argv + ["--devices", "2", "--slots-per-layer", "2", "--step", step]) == 0
        got = capsys.readouterr()
        assert got.out == one and "per device | cpu:0: hit rate" in got.err and "cpu:1: hit rate" in got.err, step


def _tiny_trace(path: str, model_cfg, n_prompts: int = 5, n_tokens: int = 24) -> None:
    """A routing trace in the tiny model's shape (its MoE layers, experts, top-k): random routes over token ids,
    the token strings ids as the tokenizer-less CLI names them. Enough to train and load a predictor."""
    from ef_jax.trace import save_trace
    rng = np.random.default_rng(0)
    L, E, K = model_cfg.num_moe_layers, model_cfg.num_experts, model_cfg.top_k
    N = n_prompts * n_tokens
    experts = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(N)]).astype(np.uint8)
    ids = rng.integers(0, 12, N)
    save_trace(path, experts, offsets=np.arange(0, N + 1, n_tokens), tokens=[str(i) for i in ids])


def test_predictive_policy_takes_a_trained_predictor(tiny_checkpoint, tmp_path, capsys):
    """train-predictor → generate --policy predictive --predictor: the CLI end to end, on a tiny checkpoint (the
    shipped model's offloaded programs and its 10 × 32 predictor cost minutes to compile on a CI CPU)."""
    pytest.importorskip("optax")
    d = tiny_checkpoint("qwen3moe-norm")
    trace = str(tmp_path / "trace.npz")
    _tiny_trace(trace, ef_jax.load(d).config)
    out = str(tmp_path / "pred")
    assert cli.main(["train-predictor", trace, "--out", out, "--max-steps", "2", "--d-model", "16", "--depth", "1",
                     "--window", "16", "--eval-every", "1", "--ngram-buckets", "0", "--token-rank", "0"]) == 0
    capsys.readouterr()
    argv = ["generate", "--model", d, "--prompt-ids", "3 4 5", "--max-new-tokens", "4"]
    assert cli.main(argv + ["--slots-per-layer", "2", "--policy", "predictive", "--predictor", out]) == 0
    ref = capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == ref.out and "hit rate" in ref.err   # offloading never changes the tokens


# ---- TextStream ------------------------------------------------------------------------------------------------
class _CharTokenizer:
    """One character per token id (ids are code points); 0xFFFD stands for half a multi-byte character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_partial_stop_strings_and_half_characters():
    import io
    buf = io.StringIO()
    s = TextStream(_CharTokenizer(), [ord(c) for c in "ab"], stops=("XYZ",), out=buf)
    printed = []
    for c in "cdXY":
        assert s.on_token(0, ord(c)) is False
        printed.append(buf.getvalue())
    assert printed == ["abc", "abcd", "abcd", "abcd"]       # "XY" may begin "XYZ": held back
    assert s.on_token(0, ord("Z")) is True and buf.getvalue() == "abcd"
    assert s.finish() == "cd" and buf.getvalue() == "abcd\n"
    buf2 = io.StringIO()
    s2 = TextStream(_CharTokenizer(), [ord("a")], out=buf2)
    s2.on_token(0, 0xFFFD)
    assert buf2.getvalue() == "a"                           # an unfinished character is not printed yet


# ---- trace path (item 13), PyTorch advice (item 8) --------------------------------------------------------------
def test_trace_reports_the_file_it_wrote(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.")
    out = str(tmp_path / "tnoext")
    assert cli.main(["trace", "--text", str(text), "--out", out]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}.npz:") and os.path.isfile(out + ".npz")


_HIDE_TORCH = ("import importlib.util, sys; _f = importlib.util.find_spec; "
               "importlib.util.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else _f(n, *a, **k); ")


def test_no_pytorch_advice_when_torch_is_absent():
    # the children's environment says nothing about transformers' advice either way (the parent's may, e.g. while
    # another thread of this process is inside ef_jax.model._import_transformers_quietly)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    control = subprocess.run([sys.executable, "-c", _HIDE_TORCH + "import transformers"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=env)
    assert "PyTorch was not found" in control.stderr, control.stderr  # the hiding works: transformers alone warns
    r = subprocess.run([sys.executable, "-c", _HIDE_TORCH + "from ef_jax import cli; sys.exit(cli.main(['info']))"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "tokenizer    yes" in r.stdout
    assert "PyTorch was not found" not in r.stderr, r.stderr


def test_cli_takes_generation_config_defaults(tiny_checkpoint, tmp_path, capsys):
    import shutil
    d = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint("qwen3moe-norm"), d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"max_new_tokens": 3, "do_sample": False}, f)
    capsys.readouterr()
    assert cli.main(["generate", "--model", d, "--prompt-ids", "3 4 5"]) == 0
    assert len(capsys.readouterr().out.split()) == 3 + 3                 # the file's 3 tokens, not ef_jax's 64
    assert cli.main(["generate", "--model", d, "--prompt-ids", "3 4 5", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.split()) == 3 + 5                 # a flag wins over the file


class _FakeTTY:
    def __init__(self):
        self.parts = []

    def isatty(self):
        return True

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_spinner_only_on_a_tty_and_clears_its_line():
    import io

    from ef_jax.cli.stream import Spinner
    quiet = io.StringIO()
    s = Spinner(quiet)
    s.start("loading")
    s.stop()
    assert quiet.getvalue() == ""                                      # not a terminal: nothing written
    tty = _FakeTTY()
    s = Spinner(tty)
    s.start("compiling and prefilling 5 prompt tokens")
    time.sleep(0.35)
    s.stop()
    written = "".join(tty.parts)
    assert "compiling and prefilling 5 prompt tokens" in written and written.count("\r") >= 3
    assert written.endswith("\r\033[K")                                # the line is cleared for the output
