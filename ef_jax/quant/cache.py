"""Quantizing routed experts at load, streamed MoE layer by MoE layer, and the cache of the result.

[CheckpointRows] → per MoE layer j, CHUNK_EXPERTS experts at a time: rows (float) → quantize (jitted, vectorised)
    → packed u8 rows appended to ENTRY/experts.bin → (the float rows are released) ... → manifest.json → rename to ENTRY
    → a PackedRows over ENTRY/experts.bin: what Model.experts reads (pinned by the engine, or read on demand)

CACHE/experts/<key>/   key = sha256 of the checkpoint's fingerprint (config + safetensors headers and sizes,
                       ef_jax.quant.store.source_fingerprint), the QuantSpec, the float host dtype and FORMAT
  experts.bin          MoE layer j at offsets[j]: u8[E, B], row e = expert e (ef_jax.host_experts row layout)
  manifest.json        layout, offsets, what it was built from (written last: a half-written entry has no manifest)

CACHE is $EF_JAX_CACHE_DIR, else ~/.cache/ef_jax. load(quant_cache=False) (--no-quant-cache) writes the same file
into a temporary directory whose file is unlinked as soon as it is open: the model reads it until it is collected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ef_jax.host_experts import ExpertRows, PackedRows, RowLayout, unpack_rows
from ef_jax.quant.codes import QuantSpec
from ef_jax.quant.pool import expert_bytes, quantize_experts

FORMAT = "ef_jax-quant-rows-1"
CHUNK_EXPERTS = 8  # experts quantized per call: bounds the float rows and the quantizer's temporaries on the host


def cache_dir() -> str:
    return os.environ.get("EF_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ef_jax")


def cache_key(path: str, spec: QuantSpec, host_dtype) -> str:
    from ef_jax.quant.store import source_fingerprint
    what = json.dumps({"format": FORMAT, "source": source_fingerprint(path), "bits": spec.bits,
                       "group_size": spec.group_size, "method": spec.method, "symmetric": spec.symmetric,
                       "host_dtype": np.dtype(host_dtype).name}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def _progress(total: int, desc: str):
    """A layer progress bar on an interactive stderr (swap for ef_jax.progress once it exists)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="layer", desc=desc, disable=not sys.stderr.isatty())


def quantized_rows(path: str, rows: ExpertRows, spec: QuantSpec, *, cache: bool = True) -> PackedRows:
    """The quantized rows of `rows` (a checkpoint's float experts): read from the cache when an entry for this
    checkpoint, spec and host dtype exists, else quantized layer by layer and written there (cache=False: to a
    temporary file). Host memory: CHUNK_EXPERTS experts' floats and their quantized copy at a time."""
    path = os.path.abspath(os.fspath(path))
    if not cache:
        tmp = tempfile.mkdtemp(prefix="quant-", dir=_tmp_root())
        try:
            out = _write(rows, spec, tmp)
            return _open(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the open file lives on until the PackedRows closes it
    entry = os.path.join(cache_dir(), "experts", cache_key(path, spec, rows.layout.dtype))
    manifest = os.path.join(entry, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            return _open(entry, json.load(f))
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    tmp = f"{entry}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        m = _write(rows, spec, tmp)
        m["source"] = path
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(m, f, indent=1)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(manifest) as f:
        return _open(entry, json.load(f))


def _tmp_root() -> str:
    root = os.path.join(cache_dir(), "tmp")
    os.makedirs(root, exist_ok=True)
    return root


def _write(rows: ExpertRows, spec: QuantSpec, out_dir: str) -> dict:
    """Quantizes every MoE layer of `rows` into out_dir/experts.bin; returns the manifest (without source)."""
    t0 = time.perf_counter()
    offsets, layout = [], None
    bar = _progress(rows.num_layers, f"quantizing experts to int{spec.bits} ({spec.method})")
    with open(os.path.join(out_dir, "experts.bin"), "wb") as f:
        E = rows.layout.num_experts
        for j in range(rows.num_layers):
            offsets.append(f.tell())
            for start in range(0, E, CHUNK_EXPERTS):  # a few experts' floats on the host at a time, not a layer
                floats = rows.rows(j, start, min(E, start + CHUNK_EXPERTS))   # [n, W] float
                pool = quantize_experts(unpack_rows(floats, rows.layout), spec)
                del floats
                layout = layout or dataclasses.replace(RowLayout.quantized(pool), num_experts=E)
                for e in range(pool.num_slots):
                    f.write(expert_bytes(pool, e).tobytes())
                del pool
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"format": FORMAT, "offsets": offsets, "bits": layout.bits, "width": layout.width,
            "num_experts": layout.num_experts, "hidden": layout.hidden, "ffn": layout.ffn,
            "leaves": [[n, list(s), d] for n, s, d in layout.quant], "quantize_s": time.perf_counter() - t0,
            "spec": {"bits": spec.bits, "group_size": spec.group_size, "method": spec.method,
                     "symmetric": spec.symmetric}}


def _open(entry: str, m: dict) -> PackedRows:
    layout = RowLayout(m["num_experts"], m["hidden"], m["ffn"], np.dtype(np.uint8), m["width"],
                       tuple((n, tuple(s), d) for n, s, d in m["leaves"]), m["bits"])
    return PackedRows(os.path.join(entry, "experts.bin"), m["offsets"], layout)
