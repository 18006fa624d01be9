"""The offload engine: decoding with routed experts streamed from pinned host memory into device slots.

per step:  cache.begin_step → embed
per MoE layer j (model layer i):
   [jit] attention + router(i) ──► top-k to host (the one sync) ──► [cache-aware routing | trace override]
   ──► cache.route(j, needed) → Loads
   issue Loads (device_put from the pinned store + in-place slot write); wait only for demand/late ones (stall)
   [jit] experts through the slot map (+ shared expert, residual)      ──► cache.release(j)
dense layers run in jitted groups of up to layers_per_group; cache.end_step → prefetches for the next step.

Batch > 1: a layer needs the union of its real tokens' experts (pad tokens are masked out). When that union is
larger than the layer's slots, the layer runs in passes of at most S experts, each pass adding its share.
Everything the host decides is counted by ExpertCache (hits, misses, prefetch used/wasted), so the simulator can
replay the same routing and must agree. With OffloadConfig(timing=...) the same bytes move but arrivals and stalls
follow the simulator's virtual clock (VirtualTransferQueue); either clock reports per-layer compute and per-copy
times to the cache (`ExpertCache.measure`) for policies that adapt to the hardware.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.model import Model
from ef_jax.models.moe import ExpertPool, Routing, moe_combine
from ef_jax.models.transformer import (KVCache, embed, layer_attention_and_route, layer_kinds, make_context,
                                       run_group)
from ef_jax.offload.cache import ExpertCache
from ef_jax.offload.config import OffloadConfig
from ef_jax.offload import routing as routing_rules
from ef_jax.offload.clock import get_timing
from ef_jax.offload.timeline import Timeline
from ef_jax.offload.transfers import ThreadedTransferQueue, TransferQueue, VirtualTransferQueue
from ef_jax.policies.registry import POLICIES


@functools.partial(jax.jit, static_argnames=("cfg", "kind"), donate_argnames=("cache",))
def _attend_route(cfg, kind, p, x, cache, positions, write_idx, valid):
    ctx = make_context(cfg, positions, write_idx, valid)
    return layer_attention_and_route(p, cfg, kind, x, cache, ctx)


@functools.partial(jax.jit, static_argnames=("cfg", "include_shared"))
def _experts(cfg, include_shared, p, h, normed, routing: Routing, keep, pool: ExpertPool, slot_map):
    """h [B, T, D] + this pass's share of the MoE output. keep f32[N, K]: 1 where (token, expert) is computed
    in this pass (real token, expert resident in this pass), else 0 (that pair contributes exactly zero)."""
    masked = Routing(logits=routing.logits, experts=routing.experts, weights=routing.weights * keep)
    y = moe_combine(p, cfg, normed, masked, pool, jnp.maximum(slot_map, 0), include_shared)
    return h + y.reshape(h.shape)


def _bind_policy(policy, model: Model):
    """A policy name whose class needs the model (router weights, ...) is built with `from_model(model)`."""
    if isinstance(policy, str):
        factory = POLICIES.get(policy.lower())
        if factory is not None and hasattr(factory, "from_model"):
            return factory.from_model(model)
    return policy


class OffloadForward:
    """Drop-in replacement for ResidentForward with experts offloaded (see module docstring)."""

    def __init__(self, model: Model, offload: OffloadConfig):
        if not isinstance(offload, OffloadConfig):
            raise TypeError(f"offload must be an ef_jax.OffloadConfig or None, got {type(offload).__name__}")
        cfg = model.config
        if not cfg.moe_layer_ids:
            raise ValueError("this model has no MoE layers: there is nothing to offload (use offload=None)")
        self.model, self.cfg, self.config = model, cfg, offload
        self.moe_index = {i: j for j, i in enumerate(cfg.moe_layer_ids)}
        self.kinds = layer_kinds(cfg)
        model.release_resident()  # an offloaded run must not also hold every expert on the device
        self.store = model.expert_store()
        self.slots = offload.resolve_slots(len(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k,
                                           self.store.bytes_per_expert)
        timing = get_timing(offload.timing)  # a virtual clock stands for its preset's expert size too
        self.cache = ExpertCache(len(cfg.moe_layer_ids), cfg.num_experts, self.slots, _bind_policy(offload.policy, model),
                                 bytes_per_expert=timing.expert_bytes if timing else self.store.bytes_per_expert,
                                 check=offload.check)
        self.timeline = Timeline() if offload.record_timeline else None
        if timing is None and offload.transfers == "thread":
            self.transfers = ThreadedTransferQueue(self.store, self.slots, self.cache, self.timeline, offload.check)
        elif timing is None:
            self.transfers = TransferQueue(self.store, self.slots, self.cache, self.timeline)
        else:
            self.transfers = VirtualTransferQueue(self.store, self.slots, self.cache, timing, self.timeline)
        self.segments = self._segments(offload.layers_per_group)
        self.compute_s = 0.0
        self.routing_log: list[np.ndarray] = []  # per step: experts i32[N_real, L_moe, K] (for replay)
        self.substitutions = 0  # cache-aware routing: (token, expert) choices swapped for a resident expert
        # Benchmarks only: route_override(step, moe_layer j, experts i32[N, K]) → i32[N, K] replaces the router's
        # choice (e.g. replayed from a real trace, so a random-weight model of a real shape sees real routing).
        self.route_override = None
        self._step = -1

    # ---- layout -----------------------------------------------------------------------------------------------
    def _segments(self, layers_per_group: int) -> list[tuple[str, tuple[int, ...]]]:
        """("dense", layers) runs of at most layers_per_group dense layers, and ("moe", (i,)) for each MoE layer."""
        out: list[tuple[str, tuple[int, ...]]] = []
        for i in range(self.cfg.num_layers):
            if self.cfg.moe_layers[i]:
                out.append(("moe", (i,)))
            elif out and out[-1][0] == "dense" and len(out[-1][1]) < layers_per_group:
                out[-1] = ("dense", out[-1][1] + (i,))
            else:
                out.append(("dense", (i,)))
        return out

    # ---- the step -----------------------------------------------------------------------------------------------
    def __call__(self, tokens, positions, write_idx, valid, cache: KVCache):
        cfg, params = self.cfg, self.model.params
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        real = np.asarray(valid)[:, write_idx:write_idx + T].reshape(-1)  # bool[N]: not padding
        x = embed(cfg, params["embed"], jnp.asarray(tokens))
        pos, widx, vld = jnp.asarray(positions, jnp.int32), jnp.asarray(write_idx, jnp.int32), jnp.asarray(valid)
        caches, routings = list(cache.layers), [None] * cfg.num_layers
        self.transfers.poll()
        self.transfers.issue(self.cache.begin_step(tokens[:, -1]))  # rows are left-padded: the last column is real
        self._step += 1
        step_routes = []
        for kind, layers in self.segments:
            t = time.perf_counter()
            if kind == "dense":
                g = layers
                x, new, _ = run_group(cfg, tuple(self.kinds[i] for i in g), tuple(params["layers"][i] for i in g),
                                      (None,) * len(g), (None,) * len(g), x, tuple(caches[i] for i in g), pos, widx, vld)
                for i, c in zip(g, new):
                    caches[i] = c
                self._timed(f"dense L{g[0]}-{g[-1]}", t, x)
                continue
            i = layers[0]
            h, normed, routing, caches[i] = _attend_route(cfg, self.kinds[i], params["layers"][i], x, caches[i],
                                                          pos, widx, vld)
            experts = np.asarray(routing.experts)  # [N, K] — the one unavoidable sync per MoE layer
            self.compute_s += time.perf_counter() - t
            self.transfers.routed(self.moe_index[i])
            routing, experts = self._rewrite_routing(self.moe_index[i], routing, experts, real)
            x = self._moe_layer(i, params["layers"][i], h, normed, routing, experts, real)
            routings[i] = routing
            step_routes.append(experts[real])
        self.transfers.issue(self.cache.end_step())
        self.routing_log.append(np.stack(step_routes, axis=1))
        return x, KVCache(layers=tuple(caches), valid=vld), routings

    def _moe_layer(self, i: int, p, h, normed, routing, experts: np.ndarray, real: np.ndarray):
        j = self.moe_index[i]
        needed = np.unique(experts[real])
        K = experts.shape[1]
        passes = [needed[s:s + self.slots] for s in range(0, len(needed), self.slots)]
        policy = self.cache.policy
        wants = getattr(policy, "hidden_point", "moe") if getattr(policy, "wants_hidden", False) else None
        for n, chunk in enumerate(passes):
            self.transfers.poll()
            loads = self.cache.route(j, chunk) if n == 0 else self.cache.require(j, chunk)
            self.transfers.issue(loads)
            if n == 0 and wants == "attention":  # behind this layer's demand loads, ahead of its expert compute
                self.transfers.issue(self.cache.hidden(j, np.asarray(h)))
            self.transfers.wait(j, chunk)
            if self.config.check:
                self.cache.verify()
                self.store.verify(self.transfers.pools, self.cache.table.expert_of_slot)
            keep = (np.isin(experts, chunk) & real[:, None]).astype(np.float32)
            slot_map = jnp.asarray(np.asarray(self.cache.table.slot_row(j), np.int32))
            t = time.perf_counter()
            h = _experts(self.cfg, n == 0, p["mlp"], h, normed, routing, jnp.asarray(keep.reshape(-1, K)),
                         self.transfers.pools[j],
                         slot_map)
            self._timed(f"experts L{i}" + (f" pass {n}" if n else ""), t, h)
            self.transfers.computed(j, len(passes))
            if n + 1 < len(passes):
                jax.block_until_ready(h)  # the next pass may evict this pass's experts: finish reading them first
                self.cache.release(j)
        if wants == "moe":  # hidden-state predictors (pre-gating) only: the layer's output
            self.transfers.issue(self.cache.hidden(j, np.asarray(h)))
        self.cache.release(j)
        return h

    def _rewrite_routing(self, j: int, routing: Routing, experts: np.ndarray, real: np.ndarray):
        """Trace override (benchmarks) and cache-aware routing (opt-in); exact routing passes through untouched."""
        if self.route_override is not None:
            new = np.asarray(self.route_override(self._step, j, experts), np.int32)
            if new.shape != experts.shape:
                raise ValueError(f"route_override returned shape {new.shape}, expected {experts.shape}")
            probs = routing_rules.router_probs(self.cfg, np.asarray(routing.logits))
            weights = routing_rules.family_weights(self.cfg, probs, new)
            routing = Routing(logits=routing.logits, experts=jnp.asarray(new), weights=jnp.asarray(weights))
            experts = new
        if self.config.routing != "cache-aware":
            return routing, experts
        resident = np.asarray(self.cache.table.slot_row(j)) >= 0
        new, weights, changed = routing_rules.cache_aware(self.cfg, np.asarray(routing.logits), experts, resident,
                                                          self.config.tolerance, real)
        if weights is None:
            return routing, experts
        self.substitutions += int((new != experts).sum())
        w = np.where(changed[:, None], weights, np.asarray(routing.weights)).astype(np.float32)
        return Routing(logits=routing.logits, experts=jnp.asarray(new), weights=jnp.asarray(w)), new

    # ---- telemetry ----------------------------------------------------------------------------------------------
    def _timed(self, name: str, t: float, out) -> None:
        if self.timeline is not None:
            jax.block_until_ready(out)
            self.timeline.add(name, "compute", t)
        self.compute_s += time.perf_counter() - t

    def stats(self) -> dict:
        c = self.cache.stats()
        if self.timeline is not None:
            self.timeline.write(self.config.record_timeline)
        accesses = self.cache.hits + self.cache.misses
        out = {"hits": self.cache.hits, "misses": self.cache.misses,
               "hit_rate": self.cache.hits / accesses if accesses else float("nan"),
               "h2d_bytes": self.transfers.bytes, "h2d_s": self.transfers.issue_s,
               "stall_s": self.transfers.stall_s,
               "compute_s": self.compute_s, "slots_per_layer": self.slots,
               "expert_bytes_resident": self.slots * self.store.num_layers * self.store.bytes_per_expert,
               "policy": self.cache.policy.name, "routing": self.config.routing,
               "routing_substitutions": self.substitutions}
        out.update(self.transfers.stats())
        # prefetch distance in layers: adaptive policies report their mean, fixed ones (pregate) their distance
        horizon = getattr(self.cache.policy, "mean_horizon", getattr(self.cache.policy, "distance", None))
        if horizon is not None:
            out["mean_horizon"] = float(horizon)
        out.update({f"cache_{k}": v for k, v in c.items() if k not in out})
        mem = self.store.device.memory_stats()  # None on CPU; on GPU the allocator's own numbers
        if mem:
            out["device_bytes_in_use"] = mem.get("bytes_in_use")
            out["device_peak_bytes_in_use"] = mem.get("peak_bytes_in_use")
        return out
