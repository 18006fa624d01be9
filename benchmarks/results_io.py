"""Shared by the benchmark scripts: the commit being measured, and writing a JSON record + markdown table."""
from __future__ import annotations

import json
import os
import subprocess


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=here).strip()
        # a run of uncommitted code must not pass for the commit's own figures (earlier results may differ)
        changed = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                           ":(top,exclude)benchmarks/results"], text=True, cwd=here).strip()
        return head + ("+uncommitted" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(out_dir: str, stem: str, record: dict, markdown: str) -> None:
    """Writes out_dir/stem.json (the record) and out_dir/stem.md, and says where."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(markdown)
    print(f"wrote {out_dir}/{stem}.json and .md")
