"""The tuned tile sizes of the expert FFN kernels, as data: one JSON file, written by a benchmark's tune mode.

benchmarks/bench_expert_ffn.py --tune (measures candidates on the device) → write_entries(path, device kind,
{(D, F): fields}) → kernels_pallas/tuned.json → read_table(path) at import → expert_ffn._TUNED
→ BlockSizes.get_default(device kind, D, F)

File layout (format 1), one entry per (device kind, D, F), every entry measured on the device it names:

  {"format": 1,
   "entries": [{"device_kind": "NVIDIA H100 80GB HBM3", "D": 2048, "F": 1408,
                "block_sizes": {"decode_block_f": 64, ...},          # BlockSizes fields (omitted: its default)
                "measured": {"decode_ms": 0.05, "commit": "..."}}]}  # how it was chosen (free-form, not read)

A missing file is an empty table (the BlockSizes defaults apply); a malformed one raises ValueError naming the
file and what is wrong, at import: a silently ignored table would make every run quietly untuned.
Host-only: plain json, no jax (the fields are turned into BlockSizes by kernels_pallas.expert_ffn).
"""
from __future__ import annotations

import json
import os

FORMAT = 1
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")


def _entry_key(path: str, i: int, e) -> tuple[str, int, int]:
    """(device kind, D, F) of entry i, or a ValueError naming what is wrong with it."""
    where = f"{path}: entries[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{where} must be an object, got {type(e).__name__}")
    missing = [k for k in ("device_kind", "D", "F", "block_sizes") if k not in e]
    if missing:
        raise ValueError(f"{where} lacks {missing} (each entry names device_kind, D, F and its block_sizes)")
    if not isinstance(e["device_kind"], str) or not e["device_kind"]:
        raise ValueError(f"{where}.device_kind must be a non-empty string (jax.devices()[0].device_kind)")
    for k in ("D", "F"):
        if isinstance(e[k], bool) or not isinstance(e[k], int) or e[k] < 1:
            raise ValueError(f"{where}.{k}={e[k]!r} must be a positive int")
    if not isinstance(e["block_sizes"], dict):
        raise ValueError(f"{where}.block_sizes must be an object of BlockSizes fields")
    return e["device_kind"], e["D"], e["F"]


def read_table(path: str = DEFAULT_PATH) -> dict[tuple[str, int, int], dict]:
    """{(device kind, D, F): BlockSizes fields} from `path`; {} when the file does not exist."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): rewrite it with benchmarks/bench_expert_ffn.py --tune, "
                         "or delete it to run untuned") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path} must be {{\"format\": {FORMAT}, \"entries\": [...]}} (kernels_pallas/tuned_table.py)")
    table: dict[tuple[str, int, int], dict] = {}
    for i, e in enumerate(doc["entries"]):
        key = _entry_key(path, i, e)
        if key in table:
            raise ValueError(f"{path}: entries[{i}] repeats (device_kind, D, F) = {key}")
        table[key] = dict(e["block_sizes"])
    return table


def write_entries(path: str, device_kind: str, found: dict[tuple[int, int], dict],
                  measured: dict[tuple[int, int], dict] | None = None) -> None:
    """Adds (or replaces) the entries of `device_kind`, one per (D, F) in `found` (BlockSizes fields), keeping every
    other entry of the file; measured: per (D, F) a record of how the choice was made. Written atomically."""
    doc = {"format": FORMAT, "entries": []}
    if os.path.exists(path):
        read_table(path)  # refuses to extend a malformed file
        with open(path) as f:
            doc = json.load(f)
    keep = [e for e in doc["entries"] if (e["device_kind"], e["D"], e["F"]) not in
            {(device_kind, d, f) for d, f in found}]
    new = [{"device_kind": device_kind, "D": d, "F": f, "block_sizes": dict(fields),
            "measured": (measured or {}).get((d, f), {})} for (d, f), fields in sorted(found.items())]
    doc["entries"] = keep + new
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
