"""Host-computed experts: the cost model and the per-miss decision (load it into a slot, or compute it on the host).

[routing of layer j: needed experts, tokens per expert] → misses (not resident) → decide_layer
  never:  every miss is loaded (a copy into a slot, as without host compute)
  always: every miss is computed on the host, from its pinned-host weights (no copy, no eviction)
  auto:   list scheduling over two resources, the copy stream and the host: each miss (most tokens first) goes
          where the layer ends sooner, given what is already queued on each (the clocks' backlogs), where
          layer end = max(device ready + layer compute, host done): the device computes the resident and loaded
          experts while the host computes its share, and the host's sum joins at the layer's end.
          When the host takes none of the layer's misses, the policy's prefetches go out as under `never`.
          Otherwise the copy stream idles from its last load until the layer ends (the next routing), and only
          that idle time is given to copies no layer waits for: first the policy's prefetches — under auto the
          cache *holds* them (ExpertCache(hold_prefetches=True)) instead of queueing them at once, where on the
          FIFO stream they would delay the next layers' demand loads and push misses onto the host — then the
          hosted experts, copied *behind* the layer for their next use, those the policy predicts to be needed
          again within its horizon (Policy.predicts_reuse) first: the cache keeps what a load would have
          brought, at no cost. What the policy asks for during the layer gets the idle time left (`spare`) at
          once; the rest is held for a later layer's idle time, or expires when its layer is routed.
→ Split(load, host, behind, fill, spare) — the cache loads `load` (waited for), `fill` (held prefetches) and
  `behind` (not waited for), the host computes `host` (ef_jax.engine.programs.host_ffn)

Timing of the host action (HostTiming): one expert over n tokens takes expert_bytes / bytes_per_s ·
(1 + token_cost · (n − 1)) on one host stream (experts of a layer run one after another, ⟂ the copy stream
and the device). The presets come from benchmarks/bench_host_experts.py (host_rates.json beside this file).

Axes: L MoE layers, E experts per layer, n tokens routed to one expert.
Plain Python, no jax: the engine (either clock) and the simulator call the same plan_layer → decide_layer.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, NamedTuple, Sequence

HOST_COMPUTE_MODES = ("never", "auto", "always")


@dataclasses.dataclass(frozen=True)
class HostTiming:
    """The host FFN's speed for one routed expert."""
    bytes_per_s: float     # the host FFN rate: expert bytes (as stored) per second at one token
    token_cost: float = 0.0  # extra time per further token, as a fraction of the one-token time
    source: str = ""       # where the numbers come from (measured, derived, assumed)

    def __post_init__(self):
        if not self.bytes_per_s > 0:
            raise ValueError(f"bytes_per_s={self.bytes_per_s} must be > 0")
        if self.token_cost < 0:
            raise ValueError(f"token_cost={self.token_cost} must be ≥ 0")

    def expert_s(self, expert_bytes: int, tokens: int) -> float:
        """Seconds the host takes for one expert over `tokens` tokens."""
        return expert_bytes / self.bytes_per_s * (1.0 + self.token_cost * max(tokens - 1, 0))


_RATES_FILE = os.path.join(os.path.dirname(__file__), "host_rates.json")


def _measured() -> dict:
    """host_rates.json (written by benchmarks/bench_host_experts.py --write-preset), or {} when absent."""
    try:
        with open(_RATES_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def host_presets() -> dict[str, HostTiming]:
    """Host FFN timings by name, for the DeepSeek-V2-Lite expert in bf16 (the timing presets' expert):
      cpu2-measured: as measured on the 2-core CPU machine (jax's CPU backend, the store's flat bf16 layout);
      cores16 / cores8: that machine's per-core rate × 16 (the H100 machine's cores) / × 8 (a consumer desktop) —
        DERIVED, assuming the batch-1 host FFN scales linearly with cores (it is compute-bound in XLA:CPU's bf16
        path at ~1 GB/s per 2 cores, far below memory bandwidth); not measured on those machines."""
    data = _measured()
    fit = data.get("fits", {}).get("bf16/flat")
    if not fit:
        return {}
    cores = data["cores"]
    where = data.get("measured_on", "this machine")
    out = {"cpu2-measured": HostTiming(fit["bytes_per_s"], fit["token_cost"], f"measured: {where}")}
    for n, name in ((16, "cores16"), (8, "cores8")):
        out[name] = HostTiming(fit["bytes_per_s"] / cores * n, fit["token_cost"],
                               f"derived: per-core rate of {where} × {n} cores (assumed linear)")
    return out


class HostStream:
    """One host worker: the layer's host experts run one after another (FIFO), ⟂ copies and device compute."""

    def __init__(self, timing: HostTiming | None):
        self.timing = timing
        self.free_at = 0.0  # when the host finishes its last queued expert
        self.busy_s = 0.0   # total host compute time

    def run(self, now: float, seconds: float) -> float:
        """Queue `seconds` of host work at `now`; returns when it is done."""
        self.free_at = max(self.free_at, now) + seconds
        self.busy_s += seconds
        return self.free_at


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """What decide_layer needs to know about the clocks, as seconds from the routing time (now = 0)."""
    device_ready: float    # when the experts already resident (arrived or in flight) are all in
    copy_free: float       # when the copy stream finishes what is queued on it
    host_free: float       # when the host finishes what is queued on it
    copy_s: float          # one expert copy on the copy stream
    compute_s: float       # the layer's device compute
    expert_bytes: int
    host: HostTiming | None


def holds_prefetches(mode: str, clocked: bool) -> bool:
    """Whether the cache holds the policy's prefetches for the copy stream's idle time (ExpertCache(
    hold_prefetches=)): under auto with a clock that knows the copy backlog (the virtual clock, the simulator); the
    wall clock has no backlog to find idle time in, so there prefetches go out at once. The engine and the
    simulator both ask here, so they build the same cache."""
    return mode == "auto" and clocked


class Split(NamedTuple):
    """decide_layer's answer, each list in the order of the misses (fill: in request order)."""
    load: list    # copied into a slot; the layer waits for them
    host: list    # computed on the host this time
    behind: list  # of `host`: also copied into a slot, behind the layer, for its next use (the layer does not wait)
    fill: list    # held prefetch requests (layer, expert) of later layers, copied now, ahead of `behind`
    spare: int    # further copies that fit before the layer ends: for the requests the policy makes during it


def decide_layer(mode: str, misses: Sequence[int], tokens: dict[int, int], costs: LayerCosts | None,
                 reused: Iterable[int] = (), wanted: Sequence[tuple[int, int]] = (), room: int = 0) -> Split:
    """Split a layer's misses into Split(load, host, behind, fill, spare).

    Args:
        mode: "never" | "auto" | "always".
        misses: the needed experts that are not resident (in the order the cache will require them).
        tokens: expert → real tokens routed to it at this layer.
        costs: the clocks' state (auto only; None: no timing known, so auto loads everything).
        reused: experts the policy predicts to be needed again within its horizon.
        wanted: the policy's held prefetch requests (layer, expert) for later layers (auto holds them:
            ExpertCache(hold_prefetches=True)), in request order.
        room: the most copies `spare` may offer to the requests the policy makes during this layer.
    """
    if mode not in HOST_COMPUTE_MODES:
        raise ValueError(f"host_compute={mode!r} must be one of {HOST_COMPUTE_MODES}")
    if mode == "never":
        return Split(list(misses), [], [], list(wanted), room)
    if mode == "always":
        return Split([], list(misses), [], list(wanted), room)
    if costs is None or costs.host is None:  # no clocks: load everything and prefetch at once, as without hosting
        return Split(list(misses), [], [], list(wanted), room)
    host_set, copy_at, end = _split_misses(costs, misses, tokens)
    if not host_set:  # the host takes nothing here: the copy stream is not shared, prefetch as `never` does
        return Split(list(misses), [], [], list(wanted), room)
    # The copy stream idles from its last load until the layer ends (the next routing): copies that fit there
    # delay no demand load. The policy's held prefetches go first (they are for the next layers; the hosted
    # experts' next use is a step away), then the hosted experts, predicted reuse first, then what the policy
    # asks for during the layer. A copy that would end after `end` is not issued: on the FIFO stream it would
    # queue ahead of the next layer's demand loads.
    hosted = [e for e in misses if e in host_set]
    n = _fits(copy_at, end, costs.copy_s, len(wanted) + len(hosted) + room)
    fill = list(wanted[:n])
    reused = set(reused)
    order = sorted(hosted, key=lambda e: (e not in reused, -tokens.get(e, 1), e))
    behind = set(order[:n - len(fill)])
    return Split([e for e in misses if e not in host_set], hosted, [e for e in hosted if e in behind], fill,
                 n - len(fill) - len(behind))


def _split_misses(c: LayerCosts, misses: Sequence[int], tokens: dict[int, int]) -> tuple[set, float, float]:
    """List scheduling over two resources: each miss (most tokens first) goes where the layer ends sooner, where
    layer end = max(device ready + layer compute, host done) — the device computes the resident and loaded
    experts while the host computes its share, and the host's sum joins at the layer's end.
    Returns (hosted experts, when the copy stream is free after the loads, when the layer ends)."""
    h = c.host
    copy_at, host_at = c.copy_free, c.host_free
    ready = c.device_ready
    host_set = set()
    host_done = 0.0  # when the layer's host share is done (0: nothing on the host yet)
    for e in sorted(misses, key=lambda e: (-tokens.get(e, 1), e)):
        load_arrive = copy_at + c.copy_s
        end_load = max(max(ready, load_arrive) + c.compute_s, host_done)
        h_done = host_at + h.expert_s(c.expert_bytes, tokens.get(e, 1))
        end_host = max(ready + c.compute_s, h_done)
        if end_host < end_load:
            host_set.add(e)
            host_at = host_done = h_done
        else:
            copy_at = load_arrive
            ready = max(ready, load_arrive)
    return host_set, copy_at, max(ready + c.compute_s, host_done)


def _fits(copy_at: float, end: float, copy_s: float, most: int) -> int:
    """How many copies (at most `most`), queued on the copy stream from `copy_at`, finish by `end`."""
    n = 0
    while n < most and copy_at + copy_s <= end:
        copy_at += copy_s
        n += 1
    return n


def tokens_per_expert(experts_nk) -> dict[int, int]:
    """experts i[N, K] of the real tokens (or a list of rows) → expert → number of tokens routed to it."""
    out: dict[int, int] = {}
    for row in experts_nk:
        for e in row:
            e = int(e)
            out[e] = out.get(e, 0) + 1
    return out


class LayerPlan(NamedTuple):
    """plan_layer's answer."""
    device: list  # experts the device computes: resident or to load, in `needed` order
    host: list    # experts the host computes
    behind: list  # of `host`, the ones also copied in behind the layer
    fill: list    # held prefetch requests (layer, expert) to load now (ExpertCache.route(..., fill=))
    spare: int    # copies the policy's requests made during the layer may still start (route(..., spare=))


def plan_layer(cache, layer: int, needed: Sequence[int], tokens: dict[int, int], mode: str,
               costs_for, log: list | None = None) -> LayerPlan:
    """The engine's and the simulator's one call, before cache.route: `needed` experts of `layer` (unique) →
    LayerPlan. cache: an ExpertCache (under auto with a clock, built with hold_prefetches=True: held prefetch
    requests get the copy stream's idle time); costs_for(resident needed experts) → LayerCosts | None, asked only
    under auto. log: a list to append (layer, loads, host, behind, fill, spare) to for every layer with a miss, a
    held request, or a policy that may ask for copies during the layer (Policy.layer_prefetches) — the layers the
    engine plans too (it dispatches the others before any decision)."""
    if mode == "never":
        return LayerPlan(list(needed), [], [], [], 0)
    soe = cache.table.slot_row(layer)
    misses = [int(e) for e in needed if soe[e] < 0]
    wanted = cache.held(layer) if cache.hold_prefetches else []
    # a policy that may ask for copies during the layer (on_route, hidden states) gets room for a layer's worth
    asks = cache.hold_prefetches and cache.policy.layer_prefetches
    if not misses and not wanted and not asks:
        return LayerPlan(list(needed), [], [], [], 0)
    costs = reused = None
    if mode == "auto":
        costs = costs_for([int(e) for e in needed if soe[e] >= 0])
        reused = [e for e in misses if cache.predicts_reuse(layer, e)]
    split = decide_layer(mode, misses, tokens, costs, reused or (), wanted,
                         cache.table.slots_per_layer if asks else 0)
    if log is not None:
        log.append((layer, list(split.load), list(split.host), list(split.behind), list(split.fill), split.spare))
    on_host = set(split.host)
    return LayerPlan([int(e) for e in needed if int(e) not in on_host], split.host, split.behind, split.fill,
                     split.spare)


def host_layer_s(timing: HostTiming | None, expert_bytes: int, host: Sequence[int], tokens: dict[int, int]) -> float:
    """Seconds the host takes for a layer's host experts (0 without a host timing)."""
    if timing is None:
        return 0.0
    return sum(timing.expert_s(expert_bytes, tokens.get(e, 1)) for e in host)
