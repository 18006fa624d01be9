"""Ctrl-C at any moment of `ef-jax generate` — importing, loading, compiling, decoding — exits 130 with no crash
(a KeyboardInterrupt inside a compile once ended in a segmentation fault) and no traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("after_s", [0.3, 1.5, 3.0])  # importing jax / loading / compiling on a 2-core CPU
def test_sigint_at_any_moment_exits_130(after_s):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "ef_jax.cli", "generate", "To be, or not", "--max-new-tokens",
                             "400"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Fatal" not in err and "interrupted after" in err


def test_the_cli_gives_an_in_process_caller_its_sigint_handler_back(tiny_checkpoint):
    from ef_jax import cli
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["generate", "--model", tiny_checkpoint("mixtral-top2"), "--prompt-ids", "3 4",
                     "--max-new-tokens", "2"]) == 0
    assert signal.getsignal(signal.SIGINT) is before
