"""Progress bars: on a terminal, not in a pipe, never with --quiet; the commands' long loops ask the policy."""
import io
import sys

import pytest

from ef_jax import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    def use(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    yield use
    progress.set_quiet(False)


def test_shown_on_a_terminal_hidden_in_a_pipe_or_quiet(stderr):
    stderr(io.StringIO())                  # a pipe / a file
    assert not progress.shown()
    assert list(progress.bar(range(3), desc="x")) == [0, 1, 2]
    tty = stderr(_Tty())
    assert progress.shown()
    assert list(progress.bar(range(3), desc="reading")) == [0, 1, 2]
    assert "reading" in tty.getvalue()     # tqdm drew on the terminal
    progress.set_quiet(True)
    assert not progress.shown()
    quiet = stderr(_Tty())
    b = progress.bar(total=10, desc="q")
    b.update(10)
    b.close()
    assert quiet.getvalue() == ""


def test_small_totals_draw_no_bar(stderr):
    tty = stderr(_Tty())
    b = progress.bar(total=10, desc="tiny", min_total=100)
    b.update(10)
    b.close()
    assert tty.getvalue() == ""


def test_quiet_flag_anywhere_on_the_command_line():
    assert progress.pop_flag(["trace", "--quiet", "--text", "a"]) == (["trace", "--text", "a"], True)
    assert progress.pop_flag(["--quiet", "sim"]) == (["sim"], True)
    assert progress.pop_flag(["sim"]) == (["sim"], False)


def test_cli_quiet_turns_progress_off(stderr, tmp_path):
    from ef_jax import cli
    stderr(_Tty())
    cli.main(["--quiet", "info", str(tmp_path / "none")])  # refused (exit 2): the flag was read first
    assert not progress.shown()
