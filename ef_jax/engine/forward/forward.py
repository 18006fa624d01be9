"""Forward: one step of every layer over an expert source — the only forward pass in ef_jax.

tokens → embed → per segment:
   fused (resident source, nothing to see between routing and experts): a group of up to layers_per_group layers
       in one program (models.run_group), experts read from the source's pools
   split: each MoE layer = attend_route program (the dense layers before it, its attention, its router) →
       [tap "attention"] → source.experts (the offloaded source syncs routing to the host here, the named point
       "route") → [tap "moe"]; dense layers after the last MoE layer in groups (run_group). A source that
       chains_attention runs the next MoE layer's attend_route at the end of this layer's expert program
       (experts_then_attend): one dispatch per MoE layer, not two
   device step (OffloadConfig(step="device"), untapped): every layer and the expert cache in one program
       (ef_jax.engine.programs.device_step; on a mesh, every device's cache in one shard_map: mesh_step)
→ hidden [B, T, D]   (the decode loop, ef_jax.engine.loop.decode, applies the head)

`Forward(model, offload=None)` builds the resident source, `Forward(model, OffloadConfig(...))` the offloaded one:
resident decoding is the offloaded loop with every expert in its slot. A model on a mesh (ef_jax.mesh) gets the mesh
sources (ef_jax.engine.sources.mesh_experts): the same segments, each device computing the experts it owns. Axes: B rows, T new tokens, D model.
"""
from __future__ import annotations

import jax
import numpy as np

from ef_jax.cache import support
from ef_jax.cache.config import OffloadConfig
from ef_jax.engine.programs.layer import Attended, AttentionInputs, NextAttention, attend_route
from ef_jax.engine.sources.base import ExpertSource, RouteOverride
from ef_jax.engine.sources.device_experts import DeviceStepExperts
from ef_jax.engine.sources.experts import OffloadedExperts, ResidentExperts
from ef_jax.engine.sources.mesh_device_experts import MeshDeviceStepExperts
from ef_jax.engine.sources.mesh_experts import MeshOffloadedExperts, MeshResidentExperts
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.model import Model
from ef_jax.models.transformer import KVCache, embed, layer_kinds, run_group


DEFAULT_LAYERS_PER_GROUP = 4


def layer_groups(num_layers: int, layers_per_group: int) -> list[tuple[int, ...]]:
    if not isinstance(layers_per_group, int) or layers_per_group < 1:
        raise ValueError(f"layers_per_group={layers_per_group!r} must be a positive int")
    return [tuple(range(i, min(i + layers_per_group, num_layers))) for i in range(0, num_layers, layers_per_group)]


def split_segments(moe_layers, layers_per_group: int) -> list[tuple[str, tuple[int, ...]]]:
    """("moe", (dense layers…, i)) for each MoE layer i, the last ≤ layers_per_group dense layers before it joined to
    its routing program (no dispatch of their own); ("dense", layers) groups of ≤ layers_per_group for the rest."""
    out: list[tuple[str, tuple[int, ...]]] = []
    pending: list[int] = []

    def flush(keep: int):
        nonlocal pending
        while len(pending) > keep:
            n = min(layers_per_group, len(pending) - keep)
            out.append(("dense", tuple(pending[:n])))
            pending = pending[n:]

    for i, moe in enumerate(moe_layers):
        if moe:
            flush(layers_per_group)
            out.append(("moe", tuple(pending) + (i,)))
            pending = []
        else:
            pending.append(i)
    flush(0)
    return out


class Forward:
    """fwd(tokens, positions, write_idx, valid, cache, tap=None) → (hidden [B, T, D], cache, routings per layer).

    Args:
      offload: None (every expert resident) or an OffloadConfig (experts streamed into slots).
      layers_per_group: layers per jitted group (default: the OffloadConfig's, else DEFAULT_LAYERS_PER_GROUP).
      kv_shape: (rows, cache positions per row), the largest KV cache the caller will decode with; needed by
        OffloadConfig(expert_memory="auto"), which leaves room for it.
    tap(j, point, h): called with MoE layer j's hidden state h [B, T, D] at "attention" (its MoE input) and "moe"
      (its output); a tapped step runs the split segments, so the fused resident path sees nothing between layers.
    """

    def __init__(self, model: Model, offload: OffloadConfig | None = None, *, layers_per_group: int | None = None,
                 kv_shape: tuple[int, int] | None = None, route_override: RouteOverride | None = None):
        cfg = model.config
        grouping = layers_per_group if offload is None or layers_per_group is not None else offload.layers_per_group
        support.check(support.Request.of(offload, num_moe_layers=cfg.num_moe_layers,
                                         devices=1 if model.mesh is None else model.mesh.size,
                                         layers_per_group=grouping is not None,
                                         route_override=route_override is not None,
                                         expert_kernel=model.expert_kernel, platform=jax.default_backend(),
                                         expert_dims=(cfg.hidden_size, cfg.moe_intermediate)))
        layers_per_group = DEFAULT_LAYERS_PER_GROUP if grouping is None else grouping
        self.model, self.cfg, self.layers_per_group = model, cfg, layers_per_group
        self.kinds = layer_kinds(cfg)
        self.counters = HostCounters()
        self.source: ExpertSource = make_source(model, offload, self.counters, kv_shape)
        self.source.set_route_override(route_override)
        self.capabilities = self.source.capabilities
        self.groups = layer_groups(cfg.num_layers, layers_per_group)
        self.segments = split_segments(cfg.moe_layers, layers_per_group)
        self.moe_index = {i: j for j, i in enumerate(cfg.moe_layer_ids)}
        self._then_fixed = [self._then_static(s) for s in range(len(self.segments))]

    @property
    def offloaded(self) -> bool:
        """Experts stream into a bounded cache (hits, misses and the routing log mean something)."""
        return self.capabilities.offloaded

    def __call__(self, tokens, positions, write_idx, valid, cache: KVCache, tap=None):
        """tokens, positions i32[B, T]; write_idx: first cache slot to write; valid bool[B, S] (host numpy, new
        tokens included). Returns (hidden [B, T, D], cache, routings: per layer Routing or None)."""
        cfg, params = self.cfg, self.model.params
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        real = np.asarray(valid)[:, write_idx:write_idx + T].reshape(-1)  # bool[N]: not padding
        # one transfer for the step's small inputs (each separate host→device put costs ~40-150 µs on a CPU)
        toks, pos, widx, vld = jax.device_put((tokens, np.asarray(positions, np.int32), np.int32(write_idx),
                                               np.asarray(valid)))
        x = embed(cfg, params["embed"], toks)
        caches, routings = list(cache.layers), [None] * cfg.num_layers
        self.counters.steps += 1
        self.counters.dispatches += 1
        self.source.begin_step(tokens[:, -1], real)
        caps = self.capabilities
        if caps.whole_step and tap is None:  # step="device": every layer in one program
            x, new, routings = self.source.step(self.kinds, params, x, caches, pos, widx, vld, toks)
            caches, routings = list(new), list(routings)
        elif caps.fused and tap is None:
            for g in self.groups:
                x = self._group(g, x, caches, routings, pos, widx, vld, self.source.pools, self.source.slot_maps)
        else:
            attended = None  # the next MoE layer's Attended, when the last expert program ran it
            for s, (kind, layers) in enumerate(self.segments):
                if kind == "dense":
                    x = self._group(layers, x, caches, routings, pos, widx, vld, None, None)
                    continue
                *dense, i = layers
                j = self.moe_index[i]
                p = params["layers"][i]
                if attended is None:
                    attended = self._attend(layers, x, caches, pos, widx, vld)
                h, normed, routing, scores = attended.h, attended.normed, attended.routing, attended.scores
                if not caps.fused:  # start moving the routing to the host now; the sync point reads it
                    routing.experts.copy_to_host_async()
                    if scores is not None:
                        scores.copy_to_host_async()
                if tap is not None:
                    tap(j, "attention", h)
                then = self._then(s, caches, pos, widx, vld) if caps.chains_attention else None
                if then is None:
                    x, routings[i] = self.source.experts(i, j, p, h, normed, routing, real, scores)
                    attended = None
                else:  # this layer's last expert program runs the next MoE layer's attention and router too
                    x, routings[i], attended = self.source.experts_then_attend(
                        i, j, p, h, normed, routing, real, then, scores)
                    *nd, ni = self.segments[s + 1][1]
                    for d, cd in zip(nd, attended.dense_caches):
                        caches[d] = cd
                    caches[ni] = attended.cache
                if tap is not None:
                    tap(j, "moe", x)
        self.source.end_step()
        return x, KVCache(layers=tuple(caches), valid=vld), routings

    def _attend(self, layers, x, caches, pos, widx, vld) -> Attended:
        """Dispatches MoE layer layers[-1]'s attend_route (the dense layers before it included); the KV caches are
        replaced by the program's."""
        *dense, i = layers
        params = self.model.params["layers"]
        out = attend_route(
            self.cfg, tuple(self.kinds[d] for d in dense), self.kinds[i], tuple(params[d] for d in dense),
            params[i], x, tuple(caches[d] for d in dense), caches[i], pos, widx, vld, self.source.scorer)
        for d, c in zip(dense, out.dense_caches):
            caches[d] = c
        caches[i] = out.cache
        self.counters.dispatches += 1
        return out

    def _then(self, s: int, caches, pos, widx, vld):
        """When segment s + 1 is a MoE layer: its attend_route's arguments as a NextAttention (for the expert
        program of segment s to run at its end), else None."""
        fixed = self._then_fixed[s]
        if fixed is None:
            return None
        dense_kinds, kind, dense, i, dense_params, p = fixed
        return NextAttention(dense_kinds=dense_kinds, kind=kind,
                             inputs=AttentionInputs(dense_params, p, pos, widx, vld, self.source.scorer),
                             dense_caches=tuple(caches[d] for d in dense), cache=caches[i])

    def _then_static(self, s: int):
        """What _then(s) hands over that no step changes (built once: it runs on every MoE layer of every step)."""
        if s + 1 >= len(self.segments) or self.segments[s + 1][0] != "moe":
            return None
        *dense, i = self.segments[s + 1][1]
        params = self.model.params["layers"]
        return (tuple(self.kinds[d] for d in dense), self.kinds[i], tuple(dense), i,
                tuple(params[d] for d in dense), params[i])

    def _group(self, g, x, caches, routings, pos, widx, vld, pools, slot_maps):
        params = self.model.params["layers"]
        pick = (lambda seq: tuple(seq[i] for i in g)) if pools is not None else (lambda seq: (None,) * len(g))
        x, new, r = run_group(self.cfg, tuple(self.kinds[i] for i in g), tuple(params[i] for i in g),
                              pick(pools), pick(slot_maps), x, tuple(caches[i] for i in g), pos, widx, vld,
                              kernel=self.model.expert_kernel)
        self.counters.dispatches += 1
        for i, c, ri in zip(g, new, r):
            caches[i], routings[i] = c, ri
        return x

    def stats(self) -> dict:
        """The source's SourceStats (ef_jax.engine.sources.base: one key set for every source) as a dict, with the
        host's counters."""
        out = self.source.stats().as_dict()
        out.update(self.counters.stats())
        out["layers_per_group"] = self.layers_per_group
        return out

    def close(self) -> None:
        """Stops the copy thread, if any. The Forward is unusable afterwards."""
        self.source.close()

    def __enter__(self) -> "Forward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_source(model: Model, offload: OffloadConfig | None, counters: HostCounters,
                kv_shape: tuple[int, int] | None) -> ExpertSource:
    """The expert source of a run: the one place a mode becomes a class (the Forward reads only its capabilities).
    ef_jax.support has refused what no source can do before this is called."""
    if model.mesh is not None:  # several devices: each holds its share of the experts (ef_jax.mesh)
        if offload is None:
            return MeshResidentExperts(model, counters)
        if offload.step == "device":
            return MeshDeviceStepExperts(model, offload, counters, kv_shape)
        return MeshOffloadedExperts(model, offload, counters, kv_shape)
    if offload is None:
        return ResidentExperts(model, counters)
    if offload.step == "device":
        return DeviceStepExperts(model, offload, counters, kv_shape)
    return OffloadedExperts(model, offload, counters, kv_shape)
