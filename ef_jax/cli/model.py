"""What the CLI learns about a checkpoint before loading its tensors: path, ModelConfig, generation defaults,
tokenizer, prompt ids and the offload budget, each refused in CLI terms (UsageError naming the flag).

--model DIR → checkpoint_dir → preflight (config.json, generation_config.json, tokenizer; no tensors read)
            → prompt_ids(text | --prompt-file | --prompt-ids | stdin)
            → offload_budget(--expert-memory SIZE | auto | --slots-per-layer)
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

from ef_jax.cli.guards import UsageError, input_file, plural, read_text
from ef_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Preflight:
    path: str
    config: ModelConfig
    generation: object        # ef_jax.generation_config.GenerationDefaults
    tokenizer: object         # a transformers tokenizer, or None


def checkpoint_dir(flag: str, path: str | None) -> str:
    """The checkpoint directory (None: the shipped default model; org/name[@rev]: its Hugging Face snapshot),
    checked to hold config.json."""
    from ef_jax import hub
    try:
        path = hub.resolve(path)
    except hub.HubError as e:
        raise UsageError(f"{flag} {e}") from None
    if path is None:
        # ef_jax.model.DEFAULT_MODEL_DIR, without importing jax
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"this build ships no default model: give {flag} DIR (a Hugging Face checkpoint)")
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is not a directory: give a Hugging Face checkpoint directory "
                         "(config.json + model.safetensors) or a Hub id org/name[@revision]")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"{flag} {path} holds no config.json: give a Hugging Face checkpoint directory")
    return path


def preflight(flag: str, path: str | None, with_tokenizer: bool = True) -> Preflight:
    """Reads config.json, generation_config.json and the tokenizer: every refusal they cause (unsupported
    architecture, quantized checkpoint, corrupt files) comes before the weights are read."""
    from ef_jax.config import from_hf_config, load_hf_config
    from ef_jax.generation_config import read_generation_config, read_generation_json
    from ef_jax.model import load_tokenizer
    path = checkpoint_dir(flag, path)
    cfg = from_hf_config(load_hf_config(path), read_generation_json(path))
    gen = read_generation_config(path)
    return Preflight(path=path, config=cfg, generation=gen, tokenizer=load_tokenizer(path) if with_tokenizer else None)


def parse_ids(flag: str, text: str, vocab_size: int) -> list[int]:
    """Whitespace-separated token ids, each in [0, vocab_size)."""
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise UsageError(f"{flag} must be whitespace-separated token ids (e.g. \"1 2 3\")") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"{flag} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise UsageError(f"{flag} holds no token ids")
    return ids


def prompt_ids(args, pf: Preflight) -> list[int]:
    """The prompt's ids from exactly one of: PROMPT (text; '-' = stdin), --prompt-file FILE, --prompt-ids IDS."""
    given = [n for n, v in (("PROMPT", args.prompt), ("--prompt-file", args.prompt_file),
                            ("--prompt-ids", args.prompt_ids)) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of PROMPT (text, or - for stdin), --prompt-file FILE or --prompt-ids "
                         f"\"1 2 3\"{'' if not given else ' (got ' + ' and '.join(given) + ')'}")
    if args.prompt_ids is not None:
        return parse_ids("--prompt-ids", args.prompt_ids, pf.config.vocab_size)
    if args.prompt_file is not None:
        text = read_text("--prompt-file", input_file("--prompt-file", args.prompt_file))
        flag = "--prompt-file"
    else:
        text = read_text("PROMPT", "-") if args.prompt == "-" else args.prompt
        flag = "PROMPT"
    if pf.tokenizer is None:
        raise UsageError(f"{flag}: {pf.path} has no tokenizer files, so the prompt cannot be text; pass token ids "
                         "with --prompt-ids \"1 2 3\" (or add tokenizer.json to the checkpoint)")
    ids = list(pf.tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids:
        raise UsageError(f"{flag} is empty: give at least one token of prompt")
    return ids


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def expert_nbytes(args, pf: Preflight, dtype: str) -> tuple[int, str]:
    """(bytes of one routed expert as the run will store it, its dtype name) from --expert-dtype / --group-size, or
    a converted store's manifest: budgets count these bytes, so int8/int4 fit more experts in the same memory."""
    from ef_jax.checkpoint import DTYPES
    from ef_jax.quant import store as quant_store
    from ef_jax.cli.convert import load_kwargs
    from ef_jax.quant.codes import quantized_nbytes, spec_for
    cfg = pf.config
    if quant_store.is_store(pf.path):
        m = quant_store.read_manifest(pf.path)
        return int(m["bytes_per_expert"]), m["expert_dtype"]
    kw = load_kwargs(args)
    try:
        spec = spec_for(kw["expert_dtype"], kw["group_size"], dtype)
        if spec is None:  # float experts are held in the stored dtype when narrower (bf16 under float32 compute)
            from ef_jax.checkpoint import host_expert_dtype
            host = host_expert_dtype(pf.path, cfg, dtype)
            return cfg.expert_params() * host.itemsize, {"bfloat16": "bf16", "float32": "f32"}.get(host.name, host.name)
        D, F = cfg.hidden_size, cfg.moe_intermediate
        return 2 * quantized_nbytes(D, F, spec) + quantized_nbytes(F, D, spec), spec.dtype_name
    except ValueError as e:
        raise UsageError(f"--expert-dtype {args.expert_dtype} --group-size {args.group_size}: {e}") from None


def offload_budget(args, pf: Preflight, dtype: str, kv_shape: tuple[int, int]) -> tuple[dict, dict | None]:
    """({"expert_memory" or "slots_per_layer": value}, the auto budget's record or None) from the flags, checked
    against this model: a budget below one token's top-k experts per MoE layer is refused with the minimum, as
    flags. --expert-memory auto is resolved here, before the weights load (one line on stderr says what it chose
    and why), and the run gets its bytes; kv_shape = (rows, cache positions per row) of the run."""
    from ef_jax import OffloadConfig
    cfg = pf.config
    K, L = cfg.top_k, cfg.num_moe_layers
    per_expert, expert_dtype = expert_nbytes(args, pf, dtype)
    need = K * L * per_expert
    if args.slots_per_layer is not None:
        if args.slots_per_layer < K:
            raise UsageError(f"--slots-per-layer {args.slots_per_layer} is fewer than the {plural(K, 'expert')} one "
                             f"token routes to per layer: give --slots-per-layer {K} or more (at most "
                             f"{cfg.num_experts}), or --policy resident for no offloading")
        return {"slots_per_layer": args.slots_per_layer}, None
    try:
        budget = OffloadConfig(expert_memory=args.expert_memory)
    except ValueError as e:
        if "positive" in str(e):
            raise UsageError(f"--expert-memory {args.expert_memory} must be more than 0 bytes; for no offloading "
                             "use --policy resident") from None
        raise UsageError(f"--expert-memory {args.expert_memory!r} is not a size: give bytes or e.g. 2GiB, 512MiB, "
                         "1.5GB, or auto") from None
    if budget.auto:
        auto = _auto_budget(pf, dtype, per_expert, expert_dtype, kv_shape)
        print(auto.describe(), file=sys.stderr)
        return {"expert_memory": auto.expert_memory}, auto.as_stats()
    try:
        budget.resolve_slots(L, cfg.num_experts, K, per_expert)
    except ValueError:
        raise UsageError(f"--expert-memory {args.expert_memory} is too small: one token needs its top-{K} experts "
                         f"in each of {L} MoE layers, {need:,} bytes at {expert_dtype}; give --expert-memory "
                         f"{_ceil_size(need)} or more, or --slots-per-layer {K}") from None
    return {"expert_memory": args.expert_memory}, None


def _auto_budget(pf: Preflight, dtype: str, per_expert: int, expert_dtype: str, kv_shape: tuple[int, int]):
    """--expert-memory auto before the model loads: the device's free memory less the non-expert weights still to
    load, the run's KV cache and the margin (ef_jax.cache.auto_budget)."""
    from ef_jax.cache.auto_budget import BudgetRequest, BudgetTooSmall, auto_budget, kv_cache_bytes
    from ef_jax.checkpoint import DTYPES, non_expert_nbytes
    from ef_jax.engine.transfer.device_memory import memory_stats
    from ef_jax.quant import store as quant_store
    cfg = pf.config
    if quant_store.is_store(pf.path):  # a converted store keeps its own dtype for everything but the experts
        dtype = quant_store.read_manifest(pf.path)["dtype"]
    itemsize = DTYPES[dtype].itemsize
    batch, context = kv_shape
    req = BudgetRequest(num_moe_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                        bytes_per_expert=per_expert, float_bytes_per_expert=cfg.expert_params() * itemsize,
                        non_expert_bytes=non_expert_nbytes(cfg, dtype), non_expert_on_device=False,
                        kv_bytes=kv_cache_bytes(cfg, batch, context, itemsize), batch=batch, context=context,
                        expert_dtype=expert_dtype)
    try:
        return auto_budget(req, memory_stats())
    except BudgetTooSmall as e:
        raise UsageError(f"--expert-memory auto: {e}; or give --slots-per-layer {cfg.top_k} to try anyway") from None


def _ceil_size(n: int) -> str:
    """A size string ≥ n bytes, in the largest binary unit that keeps one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{math.ceil(n / scale * 10) / 10:g}{unit}"
    return str(n)
