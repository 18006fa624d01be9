"""One shape for GenerationResult.stats, whether prompts were decoded in one batch or in scheduled batches.

per batch: engine.decode.sample_rows' timing stats → merge_batch_stats → counters and times summed, rates
recomputed from the sums (+ batches, schedule, schedule_s, per_batch); then the one Forward's own counters (the
expert cache served every batch) are added whole by ef_jax.generate. A single batch goes through the same path.

Every key a single-batch run reports is present after merging with the same meaning, so code written against
`res.stats["hit_rate"]` works with or without batch_size=.
"""
from __future__ import annotations

from typing import Any

# Totals over the run: the sum over batches is the run's figure.
ADDITIVE = ("prefill_s", "decode_s", "compile_s", "warmup_s", "prompt_tokens", "generated_tokens", "decoded_tokens",
            "hits", "misses", "h2d_bytes", "h2d_bytes_real", "h2d_s", "stall_s", "compute_s", "routing_substitutions",
            "virtual_total_s", "copy_busy_s")
SCHEDULE_KEYS = ("batches", "schedule", "schedule_s", "per_batch")


def merge_batch_stats(per_batch: list[dict[str, Any]], batches: list[list[int]], schedule: str,
                      schedule_s: float) -> dict[str, Any]:
    """Run-level stats from each batch's single-batch stats (same keys, plus the schedule keys)."""
    keys = [k for k in per_batch[0] if k not in SCHEDULE_KEYS]
    out: dict[str, Any] = {}
    for k in keys:
        values = [s.get(k) for s in per_batch]
        if k in ADDITIVE and all(isinstance(v, (int, float)) for v in values):
            out[k] = sum(values)
        elif k.startswith("cache_") and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[k] = sum(values)  # the cache's own counters (loads, evictions, prefetches, ...)
        elif all(v == values[0] for v in values):
            out[k] = values[0]      # settings every batch shares (policy, slots_per_layer, ...)
        elif all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in values) and \
                len({len(v) for v in values}) == 1:
            out[k] = [sum(xs) for xs in zip(*values)]  # per-layer counters
        elif all(isinstance(v, int) for v in values):
            out[k] = max(values)    # peaks (device_peak_bytes_in_use)
        elif all(isinstance(v, (int, float)) for v in values):
            out[k] = sum(values) / len(values)  # per-batch means (mean_horizon)
        else:
            out[k] = values[0]
    # rates and throughput from the summed counters, not an average of per-batch rates
    if "hits" in out and "misses" in out:
        n = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / n if n else float("nan")
    if "decoded_tokens" in out and "decode_s" in out:
        out["tokens_per_s"] = out["decoded_tokens"] / out["decode_s"] if out["decode_s"] > 0 else float("nan")
    if "batch_size" in out:
        out["batch_size"] = max(s["batch_size"] for s in per_batch)
    out.update(batches=batches, schedule=schedule, schedule_s=schedule_s, per_batch=per_batch)
    return out
