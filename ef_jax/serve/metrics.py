"""GET /metrics: the engine's snapshot in the Prometheus text exposition format (version 0.0.4).

snapshot dict (ServeEngine._publish) → one `# HELP` / `# TYPE` / sample triple per metric, prefixed `ef_jax_`.
"""
from __future__ import annotations

import math

FINISHES = ("stop", "length", "cancelled", "error")
# (snapshot key, metric name, type, help)
METRICS = [
    ("generated_tokens_total", "generated_tokens_total", "counter", "Tokens generated (EOS included)."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens prefilled."),
    ("steps_total", "decode_steps_total", "counter", "Decode steps run by the engine."),
    ("contended_steps_total", "contended_steps_total", "counter",
     "Steps with more live requests than max_batch: the scheduler chose who stepped."),
    ("repacks_total", "kv_repacks_total", "counter", "KV-cache repacks (holes squeezed, rows shifted)."),
    ("queue_depth", "queue_depth", "gauge", "Requests waiting for a KV-cache row."),
    ("live_rows", "live_requests", "gauge", "Requests holding a KV-cache row."),
    ("pool_rows", "kv_rows", "gauge", "KV-cache rows (--max-live)."),
    ("max_batch", "max_batch", "gauge", "Tokens decoded per step at most (--max-batch)."),
    ("batch_occupancy", "batch_occupancy", "gauge", "Tokens in the last decode step / max_batch."),
    ("tokens_per_second", "tokens_per_second", "gauge", "Generated tokens per second over the last 10 s."),
    ("hits", "expert_cache_hits_total", "counter", "Expert-cache hits (offloaded experts)."),
    ("misses", "expert_cache_misses_total", "counter", "Expert-cache misses (offloaded experts)."),
    ("hit_rate", "expert_cache_hit_rate", "gauge", "Expert-cache hits / accesses since start."),
    ("stall_s", "expert_stall_seconds_total", "counter", "Seconds compute waited for expert copies."),
    ("h2d_bytes", "h2d_bytes_total", "counter", "Expert bytes copied host to device."),
    ("slots_per_layer", "expert_slots_per_layer", "gauge", "Device expert slots per MoE layer."),
]


def _num(v) -> str:
    v = float(v)
    return "NaN" if math.isnan(v) else repr(v) if not v.is_integer() else str(int(v))


def render_metrics(snap: dict) -> str:
    lines = ["# HELP ef_jax_requests_total Requests finished, by finish reason.",
             "# TYPE ef_jax_requests_total counter"]
    for f in FINISHES:
        lines.append(f'ef_jax_requests_total{{finish="{f}"}} {snap.get(f"requests_{f}_total", 0)}')
    for key, name, kind, help_ in METRICS:
        if key in snap:
            lines += [f"# HELP ef_jax_{name} {help_}", f"# TYPE ef_jax_{name} {kind}", f"ef_jax_{name} {_num(snap[key])}"]
    return "\n".join(lines) + "\n"
