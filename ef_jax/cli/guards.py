"""Checks every `ef-jax` command runs on its inputs and outputs before any model work, in CLI terms.

flags → input_file / input_npz / input_dir / output_file / output_dir / read_text → UsageError("--flag ...: fix")

A refusal is one line naming the flag and the fix (ef_jax.cli.commands prints it and exits 2). Output paths are checked
up front because a failed write after hours of compute loses the work.
"""
from __future__ import annotations

import os
import sys
import zipfile


class UsageError(ValueError):
    """Bad command-line input; the message names the flag and says what to do."""


def input_file(flag: str, path: str) -> str:
    """`path` is a readable regular file ('-' = stdin is the caller's business)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: give a file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path} is not readable: check its permissions")
    return path


def input_npz(flag: str, path: str, made_by: str) -> str:
    """An existing .npz archive (numpy's zip format); `made_by` names the command that writes such files."""
    input_file(flag, path)
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{flag} {path} is not an .npz archive: give a file written by {made_by}")
    return path


def input_dir(flag: str, path: str, must_hold: str | None = None, made_by: str | None = None) -> str:
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise UsageError(f"{flag} {path} {what}: give a directory" + (f" written by {made_by}" if made_by else ""))
    if must_hold and not os.path.isfile(os.path.join(path, must_hold)):
        raise UsageError(f"{flag} {path} holds no {must_hold}: give a directory written by {made_by}")
    return path


def _writable_parent(flag: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it first or write elsewhere")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable; write elsewhere")


def output_file(flag: str, path: str, suffix: str | None = None) -> str:
    """The path a file will really be written to (`suffix` appended when missing, as numpy's savez does), after
    checking that it is not a directory and that its directory exists and is writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: give a file name")
    if suffix and not path.endswith(suffix):
        path += suffix
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory: give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and is not writable; write elsewhere")
    _writable_parent(flag, path)
    return path


def output_dir(flag: str, path: str) -> str:
    """A directory that exists or can be created (its nearest existing ancestor is a writable directory)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file: give a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UsageError(f"{flag} {path}: {probe} is not a writable directory; write elsewhere")
    return path


def read_text(flag: str, path: str) -> str:
    """A UTF-8 text file's contents ('-' reads stdin); errors name the file."""
    if path == "-":
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"{flag} -: stdin is not UTF-8 text ({e.reason} at byte {e.start})") from None
    input_file(flag, path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                         "(e.g. iconv -t utf-8)") from None


def positive(flag: str, value, minimum: int = 1):
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value} must be ≥ {minimum}")
    return value


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


HOST_COMPUTE_HELP = ("what a missing expert becomes in offloaded decoding: never (copied into a slot; default), "
                     "always (computed on the host from its pinned weights) or auto (per miss, whichever ends the "
                     "layer sooner; layer step only)")
