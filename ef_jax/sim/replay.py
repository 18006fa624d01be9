"""Trace replay: push recorded routing through the same ExpertCache + policy the engine uses, on a model clock.

[experts i[N, L, K]] → steps of B tokens → per layer: union of the step's experts → the engine's layer plan
(ef_jax.cache.plan: passes of ≤ S experts, route then require) → Loads on one FIFO copy stream ⟂ compute clock
→ ReplayStats (hit rate, bytes, stall)

Axes: N tokens, L MoE layers, K routed experts per token, E experts per layer, S slots per layer, B tokens/step.

Timing model (one step = the whole batch through every MoE layer, layers in order):
  * the routing of layer l is known when layer l-1 finishes computing (attention/router time is part of
    `layer_compute_s`); the host then issues that layer's demand loads, then the policy's prefetches;
  * one copy stream: copies run one at a time in issue order, each taking expert_bytes / h2d_bytes_per_s;
  * layer l starts computing once every expert it needs has arrived; stall = start − route time;
  * prefetches from on_step_start / on_step_end are issued at the step boundary.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ef_jax.cache import plan as layer_plan
from ef_jax.cache.expert_cache import ExpertCache
from ef_jax.cache.host_compute import (HOST_COMPUTE_MODES, HostStream, holds_prefetches, host_layer_s, plan_layer,
                                      tokens_per_expert)
from ef_jax.cache.timing import (DEEPSEEK_V2_LITE_EXPERT_BYTES, TIMING_PRESETS, CopyStream, Timing,  # noqa: F401
                                 get_timing, layer_costs)
from ef_jax.policies.base import Policy, PolicyContext
from ef_jax.policies.registry import get_policy


class PerTokenFigures:
    """bytes and stall per decoded token, for stats records with `bytes_h2d`, `stall_s` and `tokens` fields."""

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_h2d / max(self.tokens, 1)

    @property
    def stall_per_token_s(self) -> float | None:
        return None if self.stall_s is None else self.stall_s / max(self.tokens, 1)


@dataclasses.dataclass(frozen=True)
class ReplayStats(PerTokenFigures):
    """What a replay measured. Counts are per expert access (one needed expert, one layer, one step)."""
    policy: str
    slots_per_layer: int
    batch_size: int
    tokens: int
    steps: int
    hits: int
    misses: int              # includes `late`
    hit_rate: float          # hits / (hits + misses)
    late: int                # accesses that waited for an in-flight prefetch
    loads: int               # copies issued (demand + prefetch)
    demand_loads: int
    bytes_h2d: int           # loads × expert_bytes (0 without a timing model)
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    stall_s: float | None    # total compute wait for copies (None without a timing model)
    total_s: float | None    # end of the last layer's compute (None without a timing model)
    layer_hit_rate: tuple[float, ...]  # f[L]
    host_compute: str = "never"  # never | auto | always (ef_jax.cache.host_compute)
    host_computed: int = 0   # misses computed on the host instead of loaded
    host_s: float | None = None  # total host FFN time (None without a timing model)
    host_behind: int = 0     # of those, copied in behind their layer anyway (the copy stream was idle)
    bytes_not_moved: int = 0  # (host_computed − host_behind) × expert_bytes: copies the host made unnecessary

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_hit_rate"] = list(self.layer_hit_rate)
        d["bytes_per_token"] = self.bytes_per_token
        d["stall_per_token_s"] = self.stall_per_token_s
        return d


def replay_layer(cache: ExpertCache, stream: CopyStream, layer: int, need, t: float,
                 compute_s: float | None, hosted: tuple[list, list] | None = None,
                 host_done: float | None = None) -> tuple[float, float]:
    """One MoE layer through the engine's layer plan (ef_jax.cache.plan: passes of ≤ S experts when the union is
    larger) at compute-clock time t. compute_s: the layer's compute time (split over its passes), None without a
    timing model. hosted: (experts computed on the host, those copied in behind, held prefetch requests to load,
    spare idle copies), as plan_layer decided;
    host_done: when the host's share (started at t beside the device's) finishes — it joins the layer's sum at
    its end. Returns (t after the layer, its stall)."""
    now = {"t": t, "stall": 0.0}

    def compute(p: layer_plan.Pass):
        if compute_s is None:
            return
        start = stream.ready_at(layer, p.chunks[0], now["t"])
        now["stall"] += start - now["t"]
        stream.advance(start)
        now["t"] = start + compute_s / p.count

    layer_plan.run_layer([cache], layer, [np.asarray(need, np.int64)],
                         issue=lambda _, loads: stream.issue(loads, now["t"]), compute=compute,
                         poll=lambda _, p: stream.advance(now["t"]), hosted=[hosted] if hosted else None)
    if compute_s is not None:
        if host_done is not None and host_done > now["t"]:
            now["stall"] += host_done - now["t"]
            now["t"] = host_done
        cache.measure(layer_compute_s=compute_s)
    cache.release(layer)
    return now["t"], now["stall"]


def replay(experts: np.ndarray, *, slots_per_layer: int, policy: str | Policy = "lru",
           timing: str | Timing | None = None, batch_size: int = 1, num_experts: int | None = None,
           check: bool = False, host_compute: str = "never", decisions: list | None = None) -> ReplayStats:
    """Replay routing `experts` i[N, L, K] (tokens in order) through an ExpertCache.

    Args:
        experts: i[N, L, K] routed experts per token and MoE layer.
        slots_per_layer: S, cache slots per layer (caches start empty).
        policy: a policy name, PolicySpec or object; names and specs are built with `experts` and `batch_size` as
            their context's future (Belady reads it).
        timing: a Timing, a TIMING_PRESETS name, or None (count hits and loads only; no clock).
        batch_size: B consecutive tokens form one step; each layer needs the union of their experts.
        num_experts: E (default: the largest id + 1, at least S).
        check: verify cache invariants after every call (slow).
        host_compute: "never" | "auto" | "always": what a miss becomes (ef_jax.cache.host_compute); a host
            expert runs on the host stream ⟂ copies and compute, and the layer ends when both its device compute
            and its host share are done.
        decisions: a list to append (layer, loads, host experts, copied-behind experts) to, for every layer
            with a miss under host_compute other than "never" (tests compare it with the engine's).
    Returns:
        ReplayStats.
    """
    experts = np.asarray(experts)
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"experts must be an integer array [N, L, K], got {experts.dtype}{list(experts.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1")
    N, L, K = experts.shape
    E = num_experts if num_experts is not None else max(int(experts.max(initial=0)) + 1, slots_per_layer)
    timing = get_timing(timing)
    if host_compute not in HOST_COMPUTE_MODES:
        raise ValueError(f"host_compute={host_compute!r} must be one of {HOST_COMPUTE_MODES}")
    if host_compute != "never" and timing is not None and timing.host is None:
        raise ValueError(f"host_compute={host_compute!r} needs a timing preset with a host FFN timing "
                         "(Timing.host); this one has none")
    pol = get_policy(policy, PolicyContext(future=experts, batch_size=batch_size))
    cache = ExpertCache(L, E, slots_per_layer, pol, check=check, bytes_per_expert=timing.expert_bytes if timing else 0,
                        hold_prefetches=holds_prefetches(host_compute, timing is not None))
    stream = CopyStream(cache, L, E, timing)
    hstream = HostStream(timing.host if timing else None)
    compute_s = timing.layer_compute_s if timing else 0.0
    expert_bytes = timing.expert_bytes if timing else 0
    rows = experts.tolist()
    t, stall = 0.0, 0.0  # t: the compute clock (end of the last computed layer)
    for t0 in range(0, N, batch_size):
        block = rows[t0:t0 + batch_size]
        stream.issue(cache.begin_step(), t)
        for l in range(L):
            need = sorted({e for tok in block for e in tok[l]})
            hosted = host_done = None
            if host_compute != "never":  # a miss is loaded or computed on the host (ef_jax.cache.host_compute)
                stream.advance(t)
                tokens = tokens_per_expert(tok[l] for tok in block)
                need, host, behind, fill, spare = plan_layer(
                    cache, l, need, tokens, host_compute, lambda res: layer_costs(stream, hstream, timing, l, res, t),
                    decisions)
                hosted = (host, behind, fill, spare)
                if host and timing is not None:
                    host_done = hstream.run(t, host_layer_s(timing.host, expert_bytes, host, tokens))
            t, waited = replay_layer(cache, stream, l, need, t, compute_s if timing is not None else None,
                                     hosted, host_done)
            stall += waited
        stream.issue(cache.end_step(), t)
    s = cache.stats()
    layer_rate = tuple(h / max(h + m, 1) for h, m in zip(s["layer_hits"], s["layer_misses"]))
    return ReplayStats(
        policy=pol.name, slots_per_layer=slots_per_layer, batch_size=batch_size, tokens=N,
        steps=math.ceil(N / batch_size), hits=s["hits"], misses=s["misses"], hit_rate=s["hit_rate"],
        late=s["late"], loads=s["loads"], demand_loads=s["demand_loads"], bytes_h2d=s["bytes_h2d"],
        prefetch_issued=s["prefetch_issued"], prefetch_used=s["prefetch_used"],
        prefetch_wasted=s["prefetch_wasted"], stall_s=stall if timing else None, total_s=t if timing else None,
        layer_hit_rate=layer_rate, host_compute=host_compute, host_computed=s["host_computed"],
        host_s=hstream.busy_s if timing else None, host_behind=s["host_behind"],
        bytes_not_moved=(s["host_computed"] - s["host_behind"]) * expert_bytes)
