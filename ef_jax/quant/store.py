"""The converted expert store: a checkpoint whose routed experts are already quantized and packed (orbax).

convert: HF checkpoint → load_checkpoint (experts read layer by layer) → quantize experts → packed u8[E, B] per MoE layer (one row = one expert's
         pinned buffer, ef_jax.quant.pool.expert_bytes) → orbax save of {params, experts} into STORE.tmp-*
         → manifest (what it was built from) → rename to STORE (atomic: a half-written store never has the name)
load:    manifest checks (format, ef_jax version, dtype, expert dtype, group size, source fingerprint)
         → orbax restore to host numpy → experts re-viewed as QuantExpertPool (no quantization, no repacking)

STORE/
  ef_jax_store.json   the manifest (written last)
  config.json, generation_config.json, tokenizer files   copied from the source checkpoint
  weights/            orbax-checkpoint of {"params": non-expert params, "experts": {layer: u8[E, B]}}
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from ef_jax.quant.pool import QuantExpertPool, expert_bytes, quantize_experts
from ef_jax.quant.codes import QuantSpec, spec_for

MANIFEST = "ef_jax_store.json"
FORMAT = "ef_jax-expert-store"
FORMAT_VERSION = 1
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
           "vocab.json", "merges.txt", "special_tokens_map.json")


class StoreMismatch(ValueError):
    """A converted store that does not match what it is loaded with (or what it was built from)."""


def is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def _version() -> str:
    import ef_jax
    return ef_jax.__version__


def source_fingerprint(path: str) -> str:
    """sha256 over config.json and every safetensors file's name, size and header (the tensor table with dtypes,
    shapes and offsets): changes when the checkpoint's weights are replaced, costs a few KB of reads."""
    h = hashlib.sha256()
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") or f in ("config.json",
                                                                                      "model.safetensors.index.json"))
    for name in names:
        fpath = os.path.join(path, name)
        size = os.path.getsize(fpath)
        h.update(f"{name}\0{size}\0".encode())
        with open(fpath, "rb") as f:
            if name.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
            else:
                h.update(f.read())
    return h.hexdigest()


def refuse_prequantized(path: str) -> None:
    """A checkpoint whose config.json declares a quantization_config (fp8, gptq, awq, bitsandbytes, ...) holds
    weights ef_jax cannot read as floats: refuse it by name instead of loading garbage or crashing in numpy."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return  # the checkpoint reader raises the missing-config error
    try:
        with open(cfg_path) as f:
            qc = json.load(f).get("quantization_config")
    except (ValueError, AttributeError):
        return  # the checkpoint reader raises the invalid-JSON error
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise NotImplementedError(
            f"{cfg_path} declares quantization_config with quant_method={method!r}: pre-quantized checkpoints are "
            "not supported; load the unquantized (bf16/f32) checkpoint and pass expert_dtype='int8' or 'int4' "
            "(ef_jax quantizes the routed experts itself)")


def _packed(pool: QuantExpertPool) -> np.ndarray:
    """u8[E, B]: row e is expert e's pinned-buffer bytes."""
    return np.stack([expert_bytes(pool, e) for e in range(pool.num_slots)])


def _unpacked(packed: np.ndarray, layout: list[dict], bits: int) -> QuantExpertPool:
    """Inverse of _packed: views of u8[E, B] as the pool's leaves (layout: name, shape per expert, dtype)."""
    E = packed.shape[0]
    fields, off = {}, 0
    for leaf in layout:
        dt, shape = np.dtype(leaf["dtype"]), tuple(leaf["shape"])
        n = int(np.prod(shape)) * dt.itemsize
        fields[leaf["name"]] = np.ascontiguousarray(packed[:, off:off + n]).view(dt).reshape(E, *shape)
        off += n
    if off != packed.shape[1]:
        raise StoreMismatch(f"packed experts have {packed.shape[1]} bytes per expert, the manifest's layout {off}")
    for m in ("gate", "up", "down"):
        fields.setdefault(f"{m}_offset", None)
    return QuantExpertPool(bits=bits, **fields)


def convert(model_path: str, out: str, *, expert_dtype="int4", group_size: int | None = None,
            dtype: str = "bfloat16", overwrite: bool = False) -> dict:
    """Writes the converted store of HF checkpoint `model_path` to `out`; returns its manifest."""
    from ef_jax.checkpoint import DTYPES, load_checkpoint
    import orbax.checkpoint as ocp
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
    spec = spec_for(expert_dtype, group_size, dtype)
    if spec is None:
        raise ValueError(f"expert_dtype={expert_dtype!r}: a converted store holds quantized experts; "
                         "use --expert-dtype int8 or int4")
    model_path, out = os.path.abspath(os.fspath(model_path)), os.path.abspath(os.fspath(out))
    if is_store(model_path):
        raise ValueError(f"{model_path} is already a converted store: convert from the Hugging Face checkpoint")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"--out {out} already exists: choose another path or pass --overwrite")
    refuse_prequantized(model_path)
    t0 = time.perf_counter()
    cfg, params, rows = load_checkpoint(model_path, dtype)
    experts = {str(i): quantize_experts(rows.layer(j), spec) for j, i in enumerate(cfg.moe_layer_ids)}
    quantize_s = time.perf_counter() - t0
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in _COPIED:
            if os.path.isfile(os.path.join(model_path, name)):
                shutil.copy2(os.path.join(model_path, name), os.path.join(tmp, name))
        first = next(iter(experts.values()))
        layout = [{"name": n, "shape": list(a.shape[1:]), "dtype": np.dtype(a.dtype).name} for n, a in first.leaves()]
        ck = ocp.StandardCheckpointer()
        ck.save(os.path.join(tmp, "weights"), {"params": params, "experts": {k: _packed(p) for k, p in experts.items()}})
        ck.wait_until_finished()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "ef_jax_version": _version(),
            "source": {"path": model_path, "fingerprint": source_fingerprint(model_path)},
            "dtype": dtype, "expert_dtype": spec.dtype_name, "bits": spec.bits, "group_size": spec.group_size,
            "method": spec.method, "symmetric": spec.symmetric, "layout": layout,
            "moe_layers": sorted(int(k) for k in experts), "bytes_per_expert": int(sum(
                int(np.prod(leaf["shape"])) * np.dtype(leaf["dtype"]).itemsize for leaf in layout)),
            "quantize_s": quantize_s, "created_unix": time.time(),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        old = None
        if os.path.exists(out):  # --overwrite: move the old store aside only once the new one is complete
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        m = json.load(f)
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise StoreMismatch(f"{path} is a store of format {m.get('format')!r} v{m.get('format_version')}, this "
                            f"ef_jax reads {FORMAT!r} v{FORMAT_VERSION}: re-run ef-jax convert")
    return m


def check_manifest(path: str, m: dict, *, dtype=None, expert_dtype=None, group_size=None) -> None:
    """Refuses (StoreMismatch, naming the fix) a store that does not match the request or its source."""
    fix = f"re-run `ef-jax convert --model {m['source']['path']} --out {path}` with what you want"
    if m["ef_jax_version"] != _version():
        raise StoreMismatch(f"{path} was converted by ef_jax {m['ef_jax_version']}, this is {_version()}: {fix}")
    if dtype is not None and dtype != m["dtype"]:
        raise StoreMismatch(f"{path} holds non-expert weights in {m['dtype']}, loaded with dtype={dtype!r}: "
                            f"load with dtype={m['dtype']!r} (or None), or {fix}")
    if expert_dtype is not None:
        want = expert_dtype.dtype_name if isinstance(expert_dtype, QuantSpec) else expert_dtype
        if want != m["expert_dtype"]:
            raise StoreMismatch(f"{path} holds {m['expert_dtype']} experts, loaded with expert_dtype={want!r}: "
                                f"load it without expert_dtype, or {fix}")
        if isinstance(expert_dtype, QuantSpec) and (expert_dtype.method, expert_dtype.symmetric) != (
                m["method"], m["symmetric"]):
            raise StoreMismatch(f"{path} was quantized with method={m['method']!r} symmetric={m['symmetric']}, "
                                f"loaded with {expert_dtype}: {fix}")
    g = expert_dtype.group_size if isinstance(expert_dtype, QuantSpec) else group_size
    if g is not None and g != m["group_size"]:
        raise StoreMismatch(f"{path} was quantized with group_size={m['group_size']}, loaded with group_size={g}: "
                            f"load it without group_size, or {fix}")
    src = m["source"]["path"]
    if os.path.isdir(src) and not is_store(src) and source_fingerprint(src) != m["source"]["fingerprint"]:
        raise StoreMismatch(f"the source checkpoint {src} changed since {path} was converted from it "
                            f"(its safetensors/config fingerprint differs): {fix}")


def load_store(path: str, *, dtype=None, expert_dtype=None, group_size=None):
    """ef_jax.load's half for a converted store: checks the manifest, restores host numpy.
    Returns (cfg, params, host_experts, dtype, spec) for ef_jax.model.from_parts (which adds the tokenizer)."""
    import orbax.checkpoint as ocp
    from ef_jax.config import from_hf_config, load_hf_config
    path = os.path.abspath(os.fspath(path))
    m = read_manifest(path)
    check_manifest(path, m, dtype=dtype, expert_dtype=expert_dtype, group_size=group_size)
    gen_path = os.path.join(path, "generation_config.json")
    gen = json.load(open(gen_path)) if os.path.isfile(gen_path) else None
    cfg = from_hf_config(load_hf_config(path), gen)
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "weights"))
    if sorted(int(k) for k in tree["experts"]) != list(cfg.moe_layer_ids):
        raise StoreMismatch(f"{path} holds experts of layers {sorted(tree['experts'])}, its config.json has MoE "
                            f"layers {list(cfg.moe_layer_ids)}: the store is corrupt, re-run ef-jax convert")
    host_experts = tuple(_unpacked(np.asarray(tree["experts"][str(i)]), m["layout"], m["bits"])
                         if cfg.moe_layers[i] else None for i in range(cfg.num_layers))
    spec = QuantSpec(bits=m["bits"], group_size=m["group_size"], method=m["method"], symmetric=m["symmetric"])
    return cfg, tree["params"], host_experts, m["dtype"], spec
