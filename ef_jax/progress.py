"""One policy for progress bars: shown on a terminal, hidden in a pipe, a log file or with --quiet.

bar(iterable | total=, desc=) → tqdm on stderr when shown() else the same iterable/counter, silent

Every long step (reading a checkpoint, convert, trace, record, training, eval-policy) asks this module, so a
script that pipes ef-jax's output never gets carriage-return debris, and a person at a terminal always sees
that work is going on. tqdm comes with transformers and huggingface_hub; without it, nothing is shown.
"""
from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress for the rest of the process."""
    global _quiet
    _quiet = bool(quiet)


def shown(stream=None) -> bool:
    """Progress is drawn only when not quiet and `stream` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return not _quiet and bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class _Silent:
    """tqdm's surface used here, doing nothing (iteration passes through)."""

    def __init__(self, iterable=None):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def update(self, n=1):
        pass

    def set_postfix_str(self, s=""):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", min_total: float | None = None, **kw):
    """A tqdm bar on stderr if shown() (and total ≥ min_total when both are given), else a silent stand-in."""
    if not shown() or (min_total is not None and total is not None and total < min_total):
        return _Silent(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def pop_flag(argv: list[str]) -> tuple[list[str], bool]:
    """(argv without --quiet, whether it was there): accepted before or after the command."""
    return [a for a in argv if a != "--quiet"], "--quiet" in argv
