"""expert_memory="auto": the expert budget from the device's free memory — the arithmetic only (no jax; the
device query is ef_jax.engine.transfer.device_memory, the CLI's is ef_jax.cli.model).

memory_stats → free = bytes_limit − bytes_in_use
   → − pending (non-expert weights not yet on the device, the KV cache for batch × context)
   → − margin (MARGIN_FRACTION of what is left + RESERVE_BYTES)
   → ⌊… / (L · B_e)⌋ slots per MoE layer, at most E; fewer than K → BudgetTooSmall (naming the minimum free)
no memory stats (CPU) → CPU_DEFAULT_FRACTION of every expert's bytes at the model's float dtype (≥ K slots)

B_e is the bytes of one expert as stored (int8/int4: codes + scales + offsets), so the same free memory holds about
2× (int8) or 3.5× (int4) more experts than bf16.

Axes: L MoE layers, E experts per layer, K top-k, S slots per layer, B rows, C cache positions per row.
"""
from __future__ import annotations

import dataclasses
import math

from ef_jax.config import ModelConfig

AUTO = "auto"
# The margin, taken out of what is left after the weights and the KV cache:
#   RESERVE_BYTES  the fixed part: XLA's per-program temporaries (a prefill's attention scores are f32[B, H, P, C]:
#                  16 heads × 2048² × 4 B = 256 MiB for DeepSeek-V2-Lite at a 2k prompt, batch 1), the cuBLAS/cuDNN
#                  workspaces, and the staging buffers of in-flight expert copies at batch 1 (top-6 × 17.3 MB ≈
#                  100 MiB for DeepSeek-V2-Lite in bf16).
#   MARGIN_FRACTION the part that grows with the device: the BFC allocator's fragmentation (it rounds blocks and
#                  cannot always reuse freed ones), and the per-token activations and staging copies that grow
#                  with the batch. Estimated, not measured: a GPU run (stats["device_peak_bytes_in_use"]) checks it.
RESERVE_BYTES = 512 * 2**20
MARGIN_FRACTION = 0.10
# Without device memory to read (the CPU backend: memory_stats() is None; its "device" is host RAM, where the
# experts already are), auto gives a quarter of the experts' bytes at the model's float dtype: a fixed fraction so
# the same command picks the same slots on any machine (tests, CI), a quarter because that is the budget the
# benchmarks study (transfer-bound, where the policy matters), and counted at the float dtype so that quantized
# experts get more slots from the same memory, as on a GPU.
CPU_DEFAULT_FRACTION = 0.25


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, itemsize: int) -> int:
    """Bytes of the decode loop's KV cache (ef_jax.models.transformer.init_cache) for `batch` rows of `context`
    positions: every layer's k/v [B, C, Hkv, Dh] (GQA) or latent ckv [B, C, r] + kpe [B, C, dr] (MLA), in the
    model dtype, plus the bool[B, C] validity mask."""
    if cfg.attention == "mla":
        per_position = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_position = 2 * cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * batch * context * per_position * itemsize + batch * context


@dataclasses.dataclass(frozen=True)
class BudgetRequest:
    """What auto needs to know about the model and the run."""
    num_moe_layers: int            # L
    num_experts: int               # E
    top_k: int                     # K
    bytes_per_expert: int          # B_e as stored (quantized bytes for int8/int4)
    float_bytes_per_expert: int    # one expert at the model's float dtype (the CPU default's unit)
    non_expert_bytes: int          # every weight that is not a routed expert
    non_expert_on_device: bool     # True: already placed, so counted in bytes_in_use (not subtracted again)
    kv_bytes: int                  # the KV cache of batch × context, not yet allocated
    batch: int
    context: int
    expert_dtype: str = "bf16"     # for the message

    def __post_init__(self):
        for name in ("num_moe_layers", "num_experts", "top_k", "bytes_per_expert", "batch", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")

    @property
    def pending_bytes(self) -> int:
        return self.kv_bytes + (0 if self.non_expert_on_device else self.non_expert_bytes)

    @property
    def minimum_bytes(self) -> int:
        """Experts of one token: K slots in each of L MoE layers."""
        return self.top_k * self.num_moe_layers * self.bytes_per_expert


class BudgetTooSmall(ValueError):
    """The device's free memory cannot hold one token's top-k experts per MoE layer after the weights, the KV
    cache and the margin. `minimum_free` is the free memory that would."""

    def __init__(self, message: str, minimum_free: int):
        super().__init__(message)
        self.minimum_free = minimum_free


@dataclasses.dataclass(frozen=True)
class AutoBudget:
    """What auto chose and from what (stats["budget_auto"] is `as_stats()`)."""
    source: str                    # "device" (memory_stats) | "cpu-default" (no memory stats)
    expert_memory: int             # bytes of the slot pools: slots_per_layer · L · B_e
    slots_per_layer: int
    request: BudgetRequest
    free_bytes: int | None         # bytes_limit − bytes_in_use; None without memory stats
    margin_bytes: int
    available_bytes: int           # what the experts could have had (before rounding to whole slots, capping at E)

    def as_stats(self) -> dict:
        r = self.request
        return {"source": self.source, "expert_memory": self.expert_memory, "slots_per_layer": self.slots_per_layer,
                "num_experts": r.num_experts, "bytes_per_expert": r.bytes_per_expert, "expert_dtype": r.expert_dtype,
                "free_bytes": self.free_bytes, "non_expert_bytes": r.non_expert_bytes,
                "non_expert_on_device": r.non_expert_on_device, "kv_bytes": r.kv_bytes, "batch": r.batch,
                "context": r.context, "margin_bytes": self.margin_bytes, "available_bytes": self.available_bytes,
                "reason": self.describe()}

    def describe(self) -> str:
        """One line: what was chosen and why."""
        r = self.request
        per = f"{r.expert_dtype} experts of {fmt_size(r.bytes_per_expert)}"
        chose = (f"expert memory auto: {fmt_size(self.expert_memory)} = {self.slots_per_layer}/{r.num_experts} "
                 f"slots per MoE layer × {r.num_moe_layers} layers of {per}")
        if self.source == "cpu-default":
            return (f"{chose}; no device memory to read on this backend (memory_stats() is None), so the CPU default: "
                    f"{CPU_DEFAULT_FRACTION:.0%} of the experts' bytes at the model's float dtype"
                    + (f", raised to top-{r.top_k}" if self.available_bytes // (r.num_moe_layers * r.bytes_per_expert)
                       < r.top_k else ""))
        weights = "already on the device" if r.non_expert_on_device else "to load"
        line = (f"{chose}; from {fmt_size(self.free_bytes)} free on the device − non-expert weights "
                f"{fmt_size(r.non_expert_bytes)} ({weights}) − KV cache {fmt_size(r.kv_bytes)} ({r.batch} × "
                f"{r.context} positions) − margin {fmt_size(self.margin_bytes)} ({MARGIN_FRACTION:.0%} + "
                f"{fmt_size(RESERVE_BYTES)}) = {fmt_size(self.available_bytes)}")
        if self.slots_per_layer == r.num_experts:
            line += " (every expert fits)"
        return line


def fmt_size(n: int | None) -> str:
    """Bytes in the largest binary unit that keeps the figure ≥ 1."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


def free_bytes(stats: dict | None) -> int | None:
    """bytes_limit − bytes_in_use from a device's memory_stats(); None when the backend reports none."""
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats["bytes_in_use"])


def margin(left: int) -> int:
    return RESERVE_BYTES + math.ceil(MARGIN_FRACTION * max(left, 0))


def auto_budget(req: BudgetRequest, stats: dict | None) -> AutoBudget:
    """The expert budget for `req` given a device's memory_stats() (None: the CPU default). Raises BudgetTooSmall
    when the device cannot hold K slots per MoE layer."""
    L, E, K, per = req.num_moe_layers, req.num_experts, req.top_k, req.bytes_per_expert
    free = free_bytes(stats)
    if free is None:
        target = int(CPU_DEFAULT_FRACTION * E * L * req.float_bytes_per_expert)
        slots = min(E, max(K, target // (L * per)))
        return AutoBudget("cpu-default", slots * L * per, slots, req, None, 0, target)
    left = free - req.pending_bytes
    m = margin(left)
    available = left - m
    slots = min(E, max(available, 0) // (L * per))
    if slots < K:
        # smallest free f with (f − pending)·(1 − fraction) − reserve ≥ K·L·B_e
        need = req.pending_bytes + math.ceil((req.minimum_bytes + RESERVE_BYTES) / (1 - MARGIN_FRACTION))
        placed = " (already on the device)" if req.non_expert_on_device else ""
        raise BudgetTooSmall(
            f"the device has {fmt_size(free)} free, but one token needs its top-{K} experts in each of {L} MoE "
            f"layers ({fmt_size(req.minimum_bytes)} of {req.expert_dtype} experts) after the non-expert weights "
            f"{fmt_size(req.non_expert_bytes)}{placed}, the KV cache {fmt_size(req.kv_bytes)} ({req.batch} × "
            f"{req.context} positions) and the margin {fmt_size(m)}: the minimum is {fmt_size(need)} free; quantize "
            f"the experts (int4), decode fewer rows or positions, or free device memory", need)
    return AutoBudget("device", slots * L * per, slots, req, free, m, available)
