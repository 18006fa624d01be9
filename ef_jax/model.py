"""ef_jax.Model: a loaded checkpoint — config, device params, host-side experts, tokenizer — and ef_jax.load().

Routed experts are not read at load: `Model.experts` is a reader (ef_jax.host_experts) that streams each MoE layer's
rows from the checkpoint when the engine first needs them — into their one pinned-host layout (offloaded), straight
to the device (resident), or one row at a time from the page cache (host_memory="mapped"). So a model whose experts
exceed the device, or even free host RAM, can be loaded, and no host copy of the experts sits beside the pinned one.
A Model is plain data; running it never changes it.

Quantized experts (`load(..., expert_dtype="int8"|"int4")`): quantized at load, MoE layer by MoE layer, into a
packed file of rows (cached, ef_jax.quant.cache), which `Model.experts` then reads; the resident pools and the offload
store are built from the same rows, so resident and offloaded decoding run the very same quantized experts.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import numpy as np

from ef_jax.checkpoint import DTYPES, iter_param_leaves, load_checkpoint
from ef_jax.config import ModelConfig
from ef_jax.generation_config import GenerationDefaults, read_generation_config
from ef_jax.host_experts import ArrayRows, ExpertRows
from ef_jax.quant.codes import QuantSpec, spec_for
from ef_jax.tokenizer_fast import import_transformers_quietly as _import_transformers_quietly  # noqa: F401

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "default_model")


@dataclasses.dataclass(eq=False)
class Model:
    """A loaded MoE model. `params` live on the device; `experts` reads MoE layer j's routed experts as rows
    (ef_jax.host_experts: float gate | up | down per expert, or quantized bytes when `expert_quant` is set), or is
    None for a model without MoE layers. No host array of the experts is kept here."""
    config: ModelConfig
    params: Any
    experts: ExpertRows | None
    dtype: str
    tokenizer: Any = None
    path: str | None = None
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's generation_config.json defaults
    expert_quant: QuantSpec | None = None  # None: experts in `dtype`; else how they were quantized
    mesh: Any = None  # a jax Mesh with an `expert` axis (ef_jax.mesh): params replicated, experts split over it
    # How this model's routed experts are multiplied ("xla" | "pallas" | "pallas-interpret", ef_jax.models.moe
    # EXPERT_KERNELS): a static argument of every program that computes its experts, resident or offloaded. The
    # model owns it (not OffloadConfig, which says where experts live, and which a resident run has none of), so
    # two models in one process may use different kernels (dataclasses.replace(model, expert_kernel=...) shares
    # the params and the host experts; each Model object builds its own device pools and pinned store on first use).
    expert_kernel: str = "xla"

    def __post_init__(self):
        from ef_jax.models.moe import check_expert_kernel
        check_expert_kernel(self.expert_kernel)

    def place(self, tree):
        """A device pytree the engine creates (a KV cache) placed where the params are: replicated over the mesh, or
        left as it is on one device."""
        if self.mesh is None:
            return tree
        from ef_jax.mesh import replicated
        return jax.device_put(tree, replicated(self.mesh))

    def param_bytes(self) -> dict[str, int]:
        """Bytes of routed experts vs everything else, and of one expert, at the loaded dtype (quantized bytes:
        codes + scales + offsets, when the experts are quantized)."""
        other = sum(int(np.prod(a.shape)) * a.dtype.itemsize for _, a in iter_param_leaves(self.params))
        if self.experts is None:
            return {"experts": 0, "other": other, "per_expert": 0}
        return {"experts": self.experts.nbytes, "other": other, "per_expert": self.experts.layout.bytes_per_expert}

    def param_counts(self) -> dict[str, int]:
        other = sum(int(np.prod(a.shape)) for _, a in iter_param_leaves(self.params))
        experts = self.config.num_moe_layers * self.config.num_experts * self.config.expert_params()
        return {"experts": experts, "other": other, "total": experts + other}


def default_dtype() -> str:
    """bfloat16 on accelerators (halves transfer bytes), float32 on CPU (exact parity, and fast there)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str):
    """The checkpoint's tokenizer (read from tokenizer.json without transformers where it can be, see
    ef_jax.tokenizer_fast), or None when the directory has no tokenizer files."""
    if not has_tokenizer_files(path):
        return None
    from ef_jax import tokenizer_fast
    return tokenizer_fast.load(path)


def load(path: str | os.PathLike | None = None, *, dtype: str | None = None, expert_dtype=None,
         group_size: int | None = None, mesh=None, quant_cache: bool = True, expert_kernel: str = "xla") -> Model:
    """Loads a Hugging Face MoE checkpoint directory (config.json + safetensors), or a store written by
    `ef-jax convert` (then the experts are read already quantized and packed).

    Args:
      path: checkpoint directory or converted store, or a Hugging Face Hub id "org/name[@revision]" (fetched into
        the HF cache, ef_jax.hub); None loads the model shipped with ef_jax.
      dtype: "float32" | "bfloat16" for everything that is not a routed expert (and for float experts);
        default bfloat16 on GPU, float32 on CPU.
      expert_dtype: None / "bf16" (experts as `dtype`), "int8" or "int4" (routed experts quantized group-wise
        at load, see ef_jax.quant), or an ef_jax.quant.QuantSpec. Non-expert weights are never quantized.
      group_size: rows per quantization group along each expert matrix's input axis (default 64).
      mesh: a jax Mesh with one axis named "expert" (ef_jax.mesh.expert_mesh(n), or jax.make_mesh((n,), ("expert",)))
        to run on several devices: non-expert weights replicated, every MoE layer's routed experts split over the
        devices (ef_jax.mesh); None: one device.
      quant_cache: with expert_dtype int8/int4, keep the quantized experts in the user cache (EF_JAX_CACHE_DIR,
        default ~/.cache/ef_jax; keyed by the checkpoint's identity, method and group size) so the next load reads
        them instead of quantizing again; False quantizes into a temporary file removed with the model.
      expert_kernel: how the routed experts are multiplied, in every run of this model (resident, offloaded, on a
        mesh): "xla" (default: XLA's gather / ragged_dot), "pallas" (kernels_pallas.expert_ffn with the tile
        sizes tuned for the device, kernels_pallas/tuned.json; an NVIDIA GPU) or "pallas-interpret" (the same
        kernel interpreted: tests on a CPU). Stored as Model.expert_kernel.

    Routed experts are not read here (see the module docstring); float experts keep the checkpoint's dtype on the
    host when it is narrower than `dtype` (bf16 experts under float32 compute: the expert FFN upcasts them).
    """
    from ef_jax import hub
    from ef_jax.models.moe import check_expert_kernel
    check_expert_kernel(expert_kernel)  # before any other work
    path = hub.resolve(path)  # a Hub id → its snapshot directory, before any other work
    if mesh is not None:
        from ef_jax.mesh import check_axes, on_mesh
        check_axes(mesh)  # before reading any weight
        return on_mesh(load(path, dtype=dtype, expert_dtype=expert_dtype, group_size=group_size,
                            quant_cache=quant_cache, expert_kernel=expert_kernel), mesh)
    if path is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
            raise FileNotFoundError(
                f"ef_jax has no shipped default model in {DEFAULT_MODEL_DIR} in this build; "
                "pass path= a Hugging Face MoE checkpoint directory")
        path = DEFAULT_MODEL_DIR
    from ef_jax.quant import store as quant_store
    if quant_store.is_store(os.fspath(path)):  # a converted store keeps the dtype it was written in
        path = os.path.abspath(os.fspath(path))
        parts = quant_store.load_store(path, dtype=dtype, expert_dtype=expert_dtype, group_size=group_size)
        return from_parts(path, *parts, load_tokenizer(path), expert_kernel=expert_kernel)
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'bfloat16'")
    path = os.fspath(path)
    spec = spec_for(expert_dtype, group_size, dtype, at_load=True)
    # each leaf to the device as it is read; device_put, not jnp.asarray: asarray runs (and on a first run
    # compiles, on a warm one loads from the cache) one `stage` program per leaf shape, device_put is a plain copy
    cfg, params, experts = load_checkpoint(path, dtype, put=jax.device_put)
    if spec is not None and experts is not None:
        from ef_jax.quant.cache import quantized_rows
        experts = quantized_rows(path, experts, spec, cache=quant_cache)
    return from_parts(path, cfg, params, experts, dtype, spec, load_tokenizer(path), expert_kernel=expert_kernel)


def from_parts(path: str, cfg: ModelConfig, params, experts, dtype: str, spec: QuantSpec | None,
               tokenizer, *, expert_kernel: str = "xla") -> Model:
    """A Model from its parts: params go to the device; experts is an ExpertRows reader, or per layer host arrays
    (None for dense layers: a float dict or a QuantExpertPool), which are read through an ArrayRows."""
    generation = read_generation_config(path) if os.path.isdir(path) else GenerationDefaults()
    device_params = jax.device_put(params)  # a copy per leaf, no program (see load)
    return Model(config=cfg, params=device_params, experts=as_rows(experts), dtype=dtype,
                 tokenizer=tokenizer, path=path, expert_quant=spec, generation=generation, expert_kernel=expert_kernel)


def as_rows(experts) -> ExpertRows | None:
    """An ExpertRows as it is; a tuple over layers of host arrays (None for dense layers) as an ArrayRows."""
    if experts is None or isinstance(experts, ExpertRows):
        return experts
    moe = [ex for ex in experts if ex is not None]
    return ArrayRows(moe) if moe else None
