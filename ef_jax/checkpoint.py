"""Hugging Face checkpoint directory → host numpy pytrees with our names (no torch, nothing on the device).

[config.json] → ModelConfig ; [model.safetensors | model.safetensors.index.json + shards] → headers (validated)
    → non-expert tensors: one read each → rename + transpose ([out, in] → [in, out]) → `put` (the device)
    → routed experts: a reader (ef_jax.host_experts.CheckpointRows) the engine streams into their final buffers

Every tensor is checked (present, shape) before anything is returned, so a bad checkpoint fails with one
CheckpointError naming the file and tensor, and nothing is half-loaded.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from ef_jax.config import ModelConfig, from_hf_config, load_hf_config
from ef_jax.generation_config import read_generation_json

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is (missing/corrupt file, missing tensor, bad shape)."""


def _linear(prefix: str, bias: bool = False) -> dict[str, tuple[str, bool]]:
    """our name → (HF tensor name, transpose?) for a torch nn.Linear."""
    out = {"": (f"{prefix}.weight", True)}
    if bias:
        out["_bias"] = (f"{prefix}.bias", False)
    return out


def _attention_names(cfg: ModelConfig, pre: str) -> dict[str, tuple[str, bool]]:
    names: dict[str, tuple[str, bool]] = {}

    def lin(ours: str, hf: str, bias: bool = False):
        for suffix, v in _linear(f"{pre}.self_attn.{hf}", bias).items():
            names[ours + suffix] = v

    if cfg.attention == "mla":
        if cfg.q_lora_rank is None:
            lin("q", "q_proj")
        else:
            lin("q_a", "q_a_proj", cfg.qkv_bias)
            names["q_a_norm"] = (f"{pre}.self_attn.q_a_layernorm.weight", False)
            lin("q_b", "q_b_proj")
        lin("kv_a", "kv_a_proj_with_mqa", cfg.qkv_bias)
        names["kv_a_norm"] = (f"{pre}.self_attn.kv_a_layernorm.weight", False)
        lin("kv_b", "kv_b_proj")
    else:
        for n in "qkv":
            lin(n, f"{n}_proj", cfg.qkv_bias)
        if cfg.qk_norm:
            names["q_norm"] = (f"{pre}.self_attn.q_norm.weight", False)
            names["k_norm"] = (f"{pre}.self_attn.k_norm.weight", False)
    lin("o", "o_proj", cfg.o_bias)
    return names


def _expert_names(cfg: ModelConfig, pre: str) -> tuple[str, dict[str, str]]:
    """Prefix of the MoE block, and our expert projection → HF per-expert projection name."""
    if cfg.family == "mixtral":
        return f"{pre}.block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    return f"{pre}.mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _mlp_names(cfg: ModelConfig, layer: int, pre: str) -> dict[str, tuple[str, bool]]:
    if not cfg.moe_layers[layer]:
        return {k: (f"{pre}.mlp.{k}_proj.weight", True) for k in ("gate", "up", "down")}
    moe_pre, _ = _expert_names(cfg, pre)
    names = {"router": (f"{moe_pre}.gate.weight", True)}
    if cfg.shared_intermediate:
        shared = "shared_experts" if cfg.family == "deepseek_v2" else "shared_expert"
        for k in ("gate", "up", "down"):
            names[f"shared.{k}"] = (f"{pre}.mlp.{shared}.{k}_proj.weight", True)
    if cfg.shared_expert_gate:
        names["shared_gate"] = (f"{pre}.mlp.shared_expert_gate.weight", True)
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our dotted param name → shape ([in, out] for projections). Experts are not listed (see expert_shapes)."""
    D, H, Dh, V = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, D), "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    if cfg.attention == "mla":
        r, dr, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        attn = {"kv_a": (D, r + dr), "kv_a_norm": (r,), "kv_b": (r, H * (dn + dv)), "o": (H * dv, D)}
        if cfg.q_lora_rank is None:
            attn["q"] = (D, H * (dn + dr))
        else:
            attn.update(q_a=(D, cfg.q_lora_rank), q_a_norm=(cfg.q_lora_rank,), q_b=(cfg.q_lora_rank, H * (dn + dr)))
            if cfg.qkv_bias:
                attn["q_a_bias"] = (cfg.q_lora_rank,)
        if cfg.qkv_bias:
            attn["kv_a_bias"] = (r + dr,)
    else:
        Hkv = cfg.num_kv_heads
        attn = {"q": (D, H * Dh), "k": (D, Hkv * Dh), "v": (D, Hkv * Dh), "o": (H * Dh, D)}
        if cfg.qkv_bias:
            attn.update(q_bias=(H * Dh,), k_bias=(Hkv * Dh,), v_bias=(Hkv * Dh,))
        if cfg.qk_norm == "head":
            attn.update(q_norm=(Dh,), k_norm=(Dh,))
        elif cfg.qk_norm == "full":
            attn.update(q_norm=(H * Dh,), k_norm=(Hkv * Dh,))
    if cfg.o_bias:
        attn["o_bias"] = (D,)
    for i in range(cfg.num_layers):
        pre = f"layers.{i}"
        shapes[f"{pre}.attn_norm"] = shapes[f"{pre}.mlp_norm"] = (D,)
        shapes.update({f"{pre}.attn.{k}": v for k, v in attn.items()})
        if cfg.moe_layers[i]:
            shapes[f"{pre}.mlp.router"] = (D, cfg.num_experts)
            if cfg.shared_intermediate:
                S = cfg.shared_intermediate
                shapes.update({f"{pre}.mlp.shared.gate": (D, S), f"{pre}.mlp.shared.up": (D, S),
                               f"{pre}.mlp.shared.down": (S, D)})
            if cfg.shared_expert_gate:
                shapes[f"{pre}.mlp.shared_gate"] = (D, 1)
        else:
            F = cfg.dense_intermediate
            shapes.update({f"{pre}.mlp.gate": (D, F), f"{pre}.mlp.up": (D, F), f"{pre}.mlp.down": (F, D)})
    return shapes


def non_expert_nbytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of every weight that is not a routed expert, as load_checkpoint returns them (routers kept in float32
    where the family does): what the device holds besides the experts, known from the config alone."""
    total = 0
    for name, shape in expected_shapes(cfg).items():
        f32 = cfg.router_fp32_weight and name.endswith(".router")
        total += int(np.prod(shape)) * (4 if f32 else DTYPES[dtype].itemsize)
    return total


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our dotted param name → (HF tensor name, transpose?) for every non-expert tensor."""
    names = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False)}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", True)
    for i in range(cfg.num_layers):
        pre, hf = f"layers.{i}", f"model.layers.{i}"
        names[f"{pre}.attn_norm"] = (f"{hf}.input_layernorm.weight", False)
        names[f"{pre}.mlp_norm"] = (f"{hf}.post_attention_layernorm.weight", False)
        names.update({f"{pre}.attn.{k}": v for k, v in _attention_names(cfg, hf).items()})
        names.update({f"{pre}.mlp.{k}": v for k, v in _mlp_names(cfg, i, hf).items()})
    return names


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
    return {"gate": (E, D, F), "up": (E, D, F), "down": (E, F, D)}


# ---------------------------------------------------------------------------------------------------------------


class SafetensorsReader:
    """Name → file index over a single file or a sharded index; validates that every shard exists and opens."""

    def __init__(self, path: str):
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files, weight_map = ["model.safetensors"], None
        else:
            others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
            hint = f" (found {others[:3]}: convert to safetensors with save_pretrained)" if others else ""
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")
        self.path, self.headers, self.file_of = path, {}, {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"shard {fpath} listed in model.safetensors.index.json is missing")
            self.headers[fname] = _header(fpath)
            for k in self.headers[fname][0]:
                self.file_of[k] = fname
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.file_of:
                    raise CheckpointError(f"tensor {k} is listed for {fname} in the index but that shard lacks it")

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _meta(self, name: str) -> dict:
        return self.headers[self.file_of[name]][0][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta(name)["shape"])

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name ("BF16", "F32", ...)."""
        return self._meta(name)["dtype"]

    def nbytes(self, name: str) -> int:
        start, stop = self._meta(name)["data_offsets"]
        return int(stop) - int(start)


def _header(fpath: str) -> tuple[dict, int]:
    """A shard's tensor table and data offset, read from its header only (CheckpointError when it is corrupt)."""
    from ef_jax.host_experts import read_header
    try:
        header, base = read_header(fpath)
    except Exception as e:
        raise CheckpointError(f"cannot read {fpath}: {e} (the file is truncated or corrupt)") from e
    size = os.path.getsize(fpath)
    for name, meta in header.items():
        try:
            stop = base + int(meta["data_offsets"][1])
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise CheckpointError(f"cannot read {fpath}: tensor {name} has no valid data_offsets") from e
        if stop > size:
            raise CheckpointError(f"cannot read {fpath}: tensor {name} ends at byte {stop} but the file has "
                                  f"{size} (the file is truncated or corrupt)")
    return header, base


def _progress(total_bytes: int, desc: str):
    from ef_jax.progress import bar
    # Small checkpoints load in well under a second: no bar for them. A terminal only (ef_jax.progress).
    return bar(total=total_bytes, unit="B", unit_scale=True, desc=desc, min_total=64 << 20)


def _check_shape(reader: SafetensorsReader, hf_name: str, want: tuple[int, ...], transpose: bool):
    if hf_name not in reader:
        raise CheckpointError(f"tensor {hf_name} is missing from the checkpoint (needed for this "
                              f"config; looked in {sorted(set(reader.file_of.values()))})")
    got = reader.shape(hf_name)
    expect = tuple(reversed(want)) if transpose else want
    if got != expect:
        raise CheckpointError(f"tensor {hf_name} in {reader.file_of[hf_name]} has shape {got}, "
                              f"expected {expect} from config.json")


def _expert_plan(cfg: ModelConfig, reader: SafetensorsReader, layer: int) -> list[tuple[str, str, int | None, bool]]:
    """(our projection, HF name, expert index or None for a fused [E, ...] tensor, transpose) to read."""
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate
    moe_pre, proj = _expert_names(cfg, f"model.layers.{layer}")
    fused = f"{moe_pre}.experts.gate_up_proj"
    if fused in reader:  # transformers-5 fused layout: gate_up [E, 2F, D], down [E, D, F]
        _check_shape(reader, fused, (E, 2 * F, D), False)
        _check_shape(reader, f"{moe_pre}.experts.down_proj", (E, D, F), False)
        return [("gate_up", fused, None, True), ("down", f"{moe_pre}.experts.down_proj", None, True)]
    plan = []
    shapes = {"gate": (D, F), "up": (D, F), "down": (F, D)}
    for j in range(E):
        for ours, hf in proj.items():
            name = f"{moe_pre}.experts.{j}.{hf}.weight"
            _check_shape(reader, name, shapes[ours], True)
            plan.append((ours, name, j, True))
    return plan


def set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        key = int(part) if part.isdigit() else part
        if isinstance(node, list):
            node = node[key]
        else:
            node = node.setdefault(key, [] if parts[i + 1].isdigit() else {})
    node[parts[-1]] = value


def expert_dtype_for(stored, compute) -> np.dtype:
    """The host dtype of float experts: the stored dtype when it is narrower than the compute dtype (upcasting it
    inside the expert program is exact), else the compute dtype (as before: a float32 checkpoint computed in bf16
    is rounded once, at load)."""
    stored, compute = np.dtype(stored), np.dtype(compute)
    narrow = stored in (DTYPES["bfloat16"], np.dtype(np.float16))  # (ml_dtypes' bfloat16 is not of kind "f")
    return stored if narrow and stored.itemsize < compute.itemsize else compute


def _tensor_ref(reader: "SafetensorsReader", name: str):
    from ef_jax.host_experts import ST_DTYPES, TensorRef
    fname = reader.file_of[name]
    header, base = reader.headers[fname]
    meta = header[name]
    return TensorRef(os.path.join(reader.path, fname), base + int(meta["data_offsets"][0]), tuple(meta["shape"]),
                     ST_DTYPES[meta["dtype"]])


def expert_rows(cfg: ModelConfig, reader: "SafetensorsReader", plans: dict, dtype: str):
    """A CheckpointRows over the validated expert plans: nothing is read until the engine asks for a layer."""
    from ef_jax.host_experts import CheckpointRows
    refs = []
    for i in cfg.moe_layer_ids:
        plan = plans[i]
        if plan[0][2] is None:  # fused [E, ...] tensors
            refs.append(("fused", _tensor_ref(reader, plan[0][1]), _tensor_ref(reader, plan[1][1])))
            continue
        per = [[None] * 3 for _ in range(cfg.num_experts)]
        for ours, name, j, _ in plan:
            per[j][("gate", "up", "down").index(ours)] = _tensor_ref(reader, name)
        refs.append([tuple(p) for p in per])
    first = refs[0][1] if refs and refs[0][0] == "fused" else refs[0][0][0] if refs else None
    host = expert_dtype_for(first.dtype, DTYPES[dtype]) if first is not None else DTYPES[dtype]
    return CheckpointRows(refs, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate, host)


def load_checkpoint(path: str | os.PathLike, dtype: str = "float32", put=None):
    """Reads a HF MoE checkpoint directory: the non-expert weights, and a reader of the routed experts.

    Returns (cfg, params, experts): params is the pytree described in models/transformer.py, each leaf passed
    through `put` as it is read (e.g. to the device, so no host copy of the params outlives its leaf; default: host
    numpy); experts is an ef_jax.host_experts.CheckpointRows (MoE layer j's rows read on demand, see there), or
    None when the model has no MoE layer. Every tensor's presence and shape is checked before anything is read.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} is not a directory (expected a Hugging Face checkpoint dir)")
    hf = load_hf_config(path)
    cfg = from_hf_config(hf, read_generation_json(path))
    reader = SafetensorsReader(path)
    names, shapes = hf_name_map(cfg), expected_shapes(cfg)
    assert set(names) == set(shapes), set(names) ^ set(shapes)
    for ours, (hf_name, transpose) in names.items():  # validate everything before reading anything
        _check_shape(reader, hf_name, shapes[ours], transpose)
    plans = {i: _expert_plan(cfg, reader, i) for i in cfg.moe_layer_ids}
    total = sum(reader.nbytes(n) for n, _ in names.values())
    bar = _progress(total, f"loading {os.path.basename(path.rstrip('/'))}")
    np_dtype = DTYPES[dtype]
    put = put or (lambda a: a)
    fds: dict = {}
    try:
        params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
        for ours, (hf_name, transpose) in names.items():
            keep_f32 = cfg.router_fp32_weight and ours.endswith(".router")
            try:
                arr = _tensor_ref(reader, hf_name).read(fds)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {hf_name} from {reader.file_of[hf_name]}: {e}") from e
            if bar is not None:
                bar.update(arr.nbytes)
            arr = np.ascontiguousarray(arr.T if transpose else arr, dtype=np.float32 if keep_f32 else np_dtype)
            set_dotted(params, ours, put(arr))
            del arr
    finally:
        for fd in fds.values():
            os.close(fd)
        if bar is not None:
            bar.close()
    experts = expert_rows(cfg, reader, plans, dtype) if plans else None
    return cfg, params, experts


def iter_param_leaves(tree, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """(dotted name, array) for every leaf of a params pytree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_param_leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_param_leaves(v, f"{prefix}{i}.")
    elif tree is not None:
        yield prefix[:-1], tree


def header_summary(path: str, cfg: ModelConfig) -> dict:
    """From the safetensors headers alone (no weight read): the stored dtype of the routed experts and of the rest,
    their bytes on disk, and the files' total size. A converted store (no safetensors) gives {}."""
    try:
        reader = SafetensorsReader(path)
    except CheckpointError:
        return {}
    expert_names = set()
    for i in cfg.moe_layer_ids:
        moe_pre, _ = _expert_names(cfg, f"model.layers.{i}")
        expert_names |= {n for n in reader.file_of if n.startswith(f"{moe_pre}.experts.")}
    dtypes: dict[str, set] = {"experts": set(), "other": set()}
    nbytes = {"experts": 0, "other": 0}
    for name in reader.file_of:
        part = "experts" if name in expert_names else "other"
        dtypes[part].add(reader.dtype(name))
        nbytes[part] += reader.nbytes(name)
    files = sorted(set(reader.file_of.values()))
    return {"expert_dtypes": sorted(dtypes["experts"]), "other_dtypes": sorted(dtypes["other"]),
            "expert_bytes_on_disk": nbytes["experts"], "other_bytes_on_disk": nbytes["other"],
            "files": len(files), "disk_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files)}


def host_expert_dtype(path: str, cfg: ModelConfig, dtype: str) -> np.dtype:
    """The dtype float experts are held in on the host for compute `dtype` (expert_dtype_for of the stored dtype),
    from the headers alone."""
    from ef_jax.host_experts import ST_DTYPES
    stored = header_summary(path, cfg).get("expert_dtypes") or []
    return expert_dtype_for(ST_DTYPES[stored[0]], DTYPES[dtype]) if len(stored) == 1 else DTYPES[dtype]
