"""expert_memory="auto" on the device: read its free memory, size the run's KV cache, and let the host-side
arithmetic (ef_jax.cache.auto_budget) pick the slots.

device.memory_stats() (the allocator's bytes_limit / bytes_in_use; None on CPU) + the model (non-expert bytes,
bytes per expert as stored) + (rows, cache positions) of the run → auto_budget → AutoBudget

Called when the Forward builds its offloaded expert source: the model's non-expert weights are already on the device
then (counted in bytes_in_use), the KV cache and the slot pools are not yet.
"""
from __future__ import annotations

import jax

from ef_jax.cache.auto_budget import AutoBudget, BudgetRequest, BudgetTooSmall, auto_budget, kv_cache_bytes
from ef_jax.checkpoint import DTYPES
from ef_jax.model import Model


def memory_stats(device=None) -> dict | None:
    """The device allocator's statistics, or None where the backend keeps none (CPU)."""
    device = device or jax.devices()[0]
    try:
        return device.memory_stats()
    except (NotImplementedError, RuntimeError):  # a backend without allocator statistics
        return None


def expert_dtype_name(model: Model) -> str:
    if model.expert_quant is not None:
        return model.expert_quant.dtype_name
    return {"bfloat16": "bf16", "float32": "f32"}.get(model.dtype, model.dtype)


def budget_request(model: Model, bytes_per_expert: int, batch: int, context: int) -> BudgetRequest:
    """The request for a loaded model (its non-expert weights on the device) decoding batch × context."""
    cfg = model.config
    itemsize = DTYPES[model.dtype].itemsize
    return BudgetRequest(num_moe_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
                         bytes_per_expert=bytes_per_expert, float_bytes_per_expert=cfg.expert_params() * itemsize,
                         non_expert_bytes=model.param_bytes()["other"], non_expert_on_device=True,
                         kv_bytes=kv_cache_bytes(cfg, batch, context, itemsize), batch=batch, context=context,
                         expert_dtype=expert_dtype_name(model))


def resolve_auto(model: Model, bytes_per_expert: int, kv_shape: tuple[int, int] | None, device=None) -> AutoBudget:
    """The auto budget of `model` on `device` for a run of kv_shape = (rows, cache positions per row)."""
    if kv_shape is None:
        raise ValueError("expert_memory='auto' sizes the KV cache of the run, and this caller did not say how many "
                         "rows and positions it decodes: pass Forward(..., kv_shape=(rows, positions)), or give "
                         "expert_memory as bytes / slots_per_layer")
    batch, context = kv_shape
    try:
        return auto_budget(budget_request(model, bytes_per_expert, batch, context), memory_stats(device))
    except BudgetTooSmall as e:
        raise BudgetTooSmall(f"expert_memory='auto': {e}", e.minimum_free) from None


def resolve_budget(model: Model, offload, bytes_per_expert: int, kv_shape: tuple[int, int] | None, device=None):
    """(slots per MoE layer, AutoBudget or None) of an OffloadConfig for `model`: "auto" reads the device, any
    other budget is bytes or slots (ValueError below one token's top-k)."""
    cfg = model.config
    if offload.auto:
        auto = resolve_auto(model, bytes_per_expert, kv_shape, device)
        return auto.slots_per_layer, auto
    return offload.resolve_slots(cfg.num_moe_layers, cfg.num_experts, cfg.top_k, bytes_per_expert), None
