"""ExpertCache: the one place where hits, misses, loads, evictions and prefetches are decided and counted.

begin_step → for each MoE layer in order: route (= require + policy.on_route → prefetch) → [caller performs
the returned Loads, reports arrive()] → (engine) hidden → release → end_step

Axes: L MoE layers, E experts per layer, S slots per layer, K experts routed per token.

The device engine and the trace-replay simulator drive the same object with the same calls; they differ only in
how they *perform* a `Load` (engine: device_put into the slot on the copy stream; simulator: charge the timing
model) and in when they report its arrival. The cache never touches device memory.

Accounting (all per expert access, an access = one needed expert at one layer in one step):
  hit   = resident and arrived;  miss = everything else.
  late  = a miss on an expert that is resident but still in flight (a prefetch that came late): no extra load.
  prefetch_used   = a prefetched expert that was required before it was evicted (late or not).
  prefetch_wasted = a prefetched expert evicted (or flushed) before any use.
"""
from __future__ import annotations

from array import array
from typing import NamedTuple, Sequence

import numpy as np

from ef_jax.cache.slot_table import SlotSnapshot, SlotTable
from ef_jax.policies.base import Policy, Prefetch
from ef_jax.policies.registry import get_policy


class Load(NamedTuple):
    """One host→device copy the caller must perform: expert `expert` of `layer` into `slot`."""
    layer: int
    expert: int
    slot: int
    kind: str      # "demand" (the current layer waits for it) | "prefetch"
    evicted: int   # the expert that held `slot` before, -1 when the slot was free


class CacheView:
    """Read-only window on an ExpertCache, handed to policies."""
    __slots__ = ("_c",)

    def __init__(self, cache: "ExpertCache"):
        self._c = cache

    @property
    def step(self) -> int:
        """Index of the current step (0-based; -1 before the first begin_step)."""
        return self._c._step

    @property
    def layer(self) -> int:
        """Last layer routed in the current step (-1 when none yet)."""
        return self._c._layer

    @property
    def num_layers(self) -> int:
        return self._c.table.num_layers

    @property
    def num_experts(self) -> int:
        return self._c.table.num_experts

    @property
    def slots_per_layer(self) -> int:
        return self._c.table.slots_per_layer

    def resident(self, layer: int) -> np.ndarray:
        """i32[n ≤ S]: experts resident at `layer` (arrived or in flight), ascending."""
        return self._c.table.resident(layer)

    def is_resident(self, layer: int, expert: int) -> bool:
        return self._c.table.slot(layer, expert) >= 0

    def is_arrived(self, layer: int, expert: int) -> bool:
        return self.is_resident(layer, expert) and self._c._arrived[layer][expert]

    def pinned(self, layer: int) -> frozenset[int]:
        """Experts the current step needs at `layer` and still holds (never evicted)."""
        return frozenset(self._c._pinned[layer])

    def routed(self, step: int, layer: int) -> np.ndarray | None:
        """i32[n]: experts required at (`step`, `layer`), in call order; None when not (yet) routed."""
        return self._c._routed(step, layer)


class ExpertCache:
    """Per-layer expert cache of S slots, driven by a policy.

    Args:
        num_layers: L, MoE layers.
        num_experts: E, routed experts per layer.
        slots_per_layer: S.
        policy: a Policy object, or a registered name / PolicySpec for a policy that needs no model context
            (the engine and the simulator build theirs with ef_jax.policies.registry.get_policy and a context).
        bytes_per_expert: bytes one Load copies (for the `bytes_h2d` counter).
        check: verify every invariant after each call (slow; for tests and debugging).
        hold_prefetches: keep the policy's prefetch requests instead of loading them at once; the caller hands
            them out with route(..., fill=) when the copy stream has idle time for them (host_compute="auto",
            ef_jax.cache.host_compute): a prefetch issued at once queues ahead of the next layers' demand loads
            on the FIFO copy stream.
        **policy_kw: passed to the policy constructor when `policy` is a name.

    One step (the engine and the simulator make exactly these calls; every returned Load must be performed):
        loads = cache.begin_step(token_ids)        # nocache flush; policy.on_step_start → prefetches
        for layer in range(L):                     # MoE layers, in order
            loads = cache.route(layer, experts)    # unique ids (batch: the union); demand Loads, then prefetches
            ... copy each Load into its slot; cache.arrive(layer, expert) when a copy lands; the layer waits
            ... for its demand Loads (and late prefetches), reading slots via cache.table.slot_row(layer)
            loads = cache.hidden(layer, h)         # engine only, when cache.policy.wants_hidden (or, with a
                                                   # device_scorer, cache.scores(layer, logits of every layer))
            cache.measure(layer_compute_s=..., copy_s=...)   # whenever measured (optional policy hook)
            cache.release(layer)                   # after the layer's expert compute is enqueued
        loads = cache.end_step()                   # policy.on_step_end → prefetches for the next step
    A layer needing more than S experts runs in passes: route(layer, chunk0), release(layer),
    require(layer, chunk1), release(layer), ...
    """

    def __init__(self, num_layers: int, num_experts: int, slots_per_layer: int, policy: str | Policy = "lru", *,
                 bytes_per_expert: int = 0, check: bool = False, hold_prefetches: bool = False, **policy_kw):
        self.table = SlotTable(num_layers, num_experts, slots_per_layer)
        self.policy = get_policy(policy, **policy_kw)
        self.bytes_per_expert = int(bytes_per_expert)
        self.check = check
        self.view = CacheView(self)
        L, E = num_layers, num_experts
        self._step, self._layer = -1, -1
        self._arrived = [[False] * E for _ in range(L)]       # bool[L][E], meaningful for resident experts only
        self._pinned = [set() for _ in range(L)]              # per layer: experts the current step needs
        self._unused_prefetch = [set() for _ in range(L)]     # per layer: prefetched, resident, not yet required
        self._hist = array("h")                               # every required expert, flattened in call order
        self._hist_off = array("q", [0])                      # offsets into _hist, indexed step * L + layer
        self._last_required: list[int] = []                  # the experts of the latest require() call
        self.layer_hits = [0] * L
        self.layer_misses = [0] * L
        self.late = self.demand_loads = self.evictions = 0
        self.host_computed = 0  # misses computed on the host instead of loaded (route(..., host=))
        self.host_behind = 0    # of those, copied in behind their layer anyway (route(..., behind=))
        self.prefetch_issued = self.prefetch_used = self.prefetch_wasted = self.prefetch_dropped = 0
        self.hold_prefetches = hold_prefetches
        self._held: dict[tuple[int, int], None] = {}  # held prefetch requests (layer, expert), in request order
        self._spare = 0            # requests still loaded at once in the routed layer's idle copy time
        self.prefetch_held = 0     # requests held (hold_prefetches)
        self.prefetch_expired = 0  # of those, never handed out: their layer was routed first, or the step ended
        self.policy.reset(num_layers, num_experts, slots_per_layer)

    # ---- step / layer events (the engine's and simulator's call sequence) ---------------------------------
    def begin_step(self, token_ids: np.ndarray | None = None) -> list[Load]:
        """Start a new step (one decode step of the whole batch). Returns prefetch Loads from on_step_start."""
        self._step += 1
        self._layer = -1
        for pins in self._pinned:
            pins.clear()
        if self.policy.flush_each_step:
            self.flush()
        self._pad_history(self._step * self.table.num_layers)
        self._spare = 0
        return self._issue(self.policy.on_step_start(self._step, token_ids, self.view))

    def route(self, layer: int, experts: Sequence[int], host: Sequence[int] = (),
              behind: Sequence[int] = (), fill: Sequence[tuple[int, int]] = (), spare: int = 0) -> list[Load]:
        """The router chose `experts` (unique; batch > 1: the union) at `layer`: `require` them, then ask the
        policy for prefetches. Returns the demand Loads first (the layer waits for them), then the prefetches.
        host: further needed experts, not resident, that the host computes this time (ef_jax.cache.host_compute):
        each counts as a miss and an access, is neither loaded nor pinned, and the policy's on_route sees them
        among the layer's experts. behind: those of `host` the policy predicts to be reused: they are also
        copied into a slot, behind the demand loads, as a prefetch the layer does not wait for. fill: held
        prefetch requests (hold_prefetches; from held()) to load now, after the demand loads, ahead of `behind`.
        spare: how many of the
        requests the policy makes from now until close_idle() (on_route, and hidden/scores at the attention
        point) are loaded at once rather than held: the copy stream's idle time left in this layer."""
        for l, e in fill:
            if (l, e) not in self._held:
                raise ValueError(f"fill: ({l}, {e}) is not a held prefetch request; take them from held()")
        loads = self.require(layer, experts)
        if host:
            self._on_host(layer, host)
        for l, e in fill:  # for the next layers: ahead of `behind` (the next step)
            del self._held[(l, e)]
            loads += self.prefetch(l, [e])
        if behind:
            copied = self.prefetch(layer, behind)
            self.host_behind += len(copied)
            loads += copied
        self._spare = spare
        loads += self._issue(self.policy.on_route(layer, self._last_required, self.view))
        return loads

    def _on_host(self, layer: int, host: Sequence[int]) -> None:
        exps = self._validate(layer, host, "host")
        soe = self.table.slot_row(layer)
        if any(soe[e] >= 0 for e in exps) or set(exps) & set(self._last_required):
            raise ValueError(f"host: experts {exps} at layer {layer} must be misses (not resident, not required)")
        self._hist.extend(exps)
        self._hist_off[-1] = len(self._hist)
        self._last_required = self._last_required + exps
        for e in exps:
            self.policy.on_access(layer, e, False)
        self.layer_misses[layer] += len(exps)
        self.host_computed += len(exps)

    def close_idle(self) -> None:
        """The layer's compute starts: requests from now on are held (route(..., spare=) gave the idle time)."""
        self._spare = 0

    def held(self, layer: int) -> list[tuple[int, int]]:
        """The held prefetch requests still worth a copy when `layer` is being routed, in request order: for a
        later layer of this step and not resident. The others are dropped (counted in prefetch_expired)."""
        soe = self.table.slot_row
        stale = [(l, e) for l, e in self._held if l <= layer or soe(l)[e] >= 0]
        for k in stale:
            del self._held[k]
        self.prefetch_expired += len(stale)
        return list(self._held)

    def predicts_reuse(self, layer: int, expert: int) -> bool:
        """The policy's prediction that `expert` is needed again at `layer` within its horizon."""
        return self.policy.predicts_reuse(layer, expert, self.view)

    def hidden(self, layer: int, hidden: np.ndarray) -> list[Load]:
        """Engine only: hidden states of `layer` (host numpy) for hidden-state predictors. Returns prefetches."""
        return self._issue(self.policy.on_hidden(layer, hidden, self.view))

    def scores(self, layer: int, scores: np.ndarray) -> list[Load]:
        """Engine only: the policy's pre-gate logits of every layer f32[L, B, E], computed on the device from
        `layer`'s hidden state (policy.device_scorer). Returns prefetches."""
        return self._issue(self.policy.on_scores(layer, scores, self.view))

    def release(self, layer: int) -> None:
        """`layer` has consumed its experts (its compute is enqueued): they may now be evicted by prefetches."""
        self._pinned[layer].clear()
        if self.check:
            self.verify()

    def end_step(self) -> list[Load]:
        """The step is done; releases every pin. Returns prefetch Loads from on_step_end (for the next step)."""
        for pins in self._pinned:
            pins.clear()
        self.prefetch_expired += len(self._held)  # requests for this step's layers: their layers are done
        self._held.clear()
        self._spare = 0
        return self._issue(self.policy.on_step_end(self._step, self.view))

    def measure(self, *, layer_compute_s: float | None = None, copy_s: float | None = None) -> None:
        """Runtime measurements for policies that adapt to the hardware (optional hook `policy.on_measure`).

        The engine (wall or virtual clock) and the simulator report one MoE layer's compute time on the critical
        path (`layer_compute_s`) and one finished expert copy's duration on the copy stream (`copy_s`, for
        `bytes_per_expert` bytes). BasePolicy.on_measure ignores them.
        """
        self.policy.on_measure(layer_compute_s=layer_compute_s, copy_s=copy_s, copy_bytes=self.bytes_per_expert)

    def arrive(self, layer: int, expert: int) -> None:
        """The copy of `expert` into its slot at `layer` finished. Ignored when it was evicted meanwhile."""
        if self.table.slot(layer, expert) >= 0:
            self._arrived[layer][expert] = True

    def arrive_all(self) -> None:
        """Every in-flight copy finished."""
        for l in range(self.table.num_layers):
            arrived = self._arrived[l]
            for e in self.table.expert_row(l):
                if e >= 0:
                    arrived[e] = True

    # ---- primitives ----------------------------------------------------------------------------------------
    def require(self, layer: int, experts: Sequence[int]) -> list[Load]:
        """Make `experts` resident at `layer` for the current step; pins them until release()/end_step().

        Marks hits, evicts (policy.victim among residents that are neither needed nor pinned) and returns the
        demand Loads the caller must perform. Layers go in increasing order within a step. A layer whose needs
        exceed S may be computed in several passes: call require(layer, chunk) again for the same layer after
        release(layer) (the previous pass's experts then become evictable).
        """
        exps = self._validate_require(layer, experts)
        if layer == self._layer:  # another pass over the same layer: extend its history entry
            self._hist.extend(exps)
            self._hist_off[-1] = len(self._hist)
        else:
            self._pad_history(self._step * self.table.num_layers + layer)
            self._hist.extend(exps)
            self._hist_off.append(len(self._hist))
        self._layer = layer
        self._last_required = exps
        soe = self.table.slot_row(layer)
        arrived, unused, policy = self._arrived[layer], self._unused_prefetch[layer], self.policy
        self._pinned[layer].update(exps)
        missing, hits = [], 0
        for e in exps:
            hit = False
            if soe[e] >= 0:
                if e in unused:
                    unused.discard(e)
                    self.prefetch_used += 1
                if arrived[e]:
                    hit = True
                    hits += 1
                else:
                    self.late += 1  # in flight: the layer waits for it, no second copy
            else:
                missing.append(e)
            policy.on_access(layer, e, hit)
        self.layer_hits[layer] += hits
        self.layer_misses[layer] += len(exps) - hits
        candidates = None  # evictable residents, computed on first need
        loads = []
        for e in missing:
            if self.table.free_slot(layer) < 0 and candidates is None:
                candidates = self._evictable(layer, ())
            loads.append(self._load(layer, e, "demand", candidates))
        self.demand_loads += len(loads)
        if self.check:
            self.verify()
        return loads

    def prefetch(self, layer: int, experts: Sequence[int]) -> list[Load]:
        """Start loading `experts` at `layer` ahead of need. Already-resident experts are skipped; a prefetch
        that finds nothing evictable (everything pinned or requested in this same call) is dropped."""
        exps = self._validate(layer, experts, "prefetch")
        soe = self.table.slot_row(layer)
        candidates, loads = None, []
        for e in exps:
            if soe[e] >= 0:
                continue
            if self.table.free_slot(layer) < 0 and candidates is None:
                candidates = self._evictable(layer, exps)
            if self.table.free_slot(layer) < 0 and not candidates:
                self.prefetch_dropped += 1
                continue
            loads.append(self._load(layer, e, "prefetch", candidates))
            self._unused_prefetch[layer].add(e)
        self.prefetch_issued += len(loads)
        if self.check:
            self.verify()
        return loads

    def flush(self) -> None:
        """Evict everything (pins included; only call between steps)."""
        for l in range(self.table.num_layers):
            self.evictions += self.table.num_resident(l)
            self.prefetch_wasted += len(self._unused_prefetch[l])
            self._unused_prefetch[l].clear()
            self._pinned[l].clear()
        self.table.clear()

    # ---- results -------------------------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        return sum(self.layer_hits)

    @property
    def misses(self) -> int:
        return sum(self.layer_misses)

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_issued

    def arrived_row(self, layer: int) -> list[bool]:
        """The live arrived flags of `layer` (bool[E], meaningful where the expert is resident). Read, never write."""
        return self._arrived[layer]

    def snapshot(self) -> SlotSnapshot:
        """Residency as two numpy arrays."""
        return self.table.snapshot()

    def stats(self) -> dict:
        hits, misses = self.hits, self.misses
        return {
            "policy": self.policy.name, "steps": self._step + 1, "slots_per_layer": self.table.slots_per_layer,
            "hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1), "late": self.late,
            "loads": self.loads, "demand_loads": self.demand_loads, "evictions": self.evictions,
            "bytes_h2d": self.loads * self.bytes_per_expert,
            "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
            "prefetch_wasted": self.prefetch_wasted, "prefetch_dropped": self.prefetch_dropped,
            "prefetch_held": self.prefetch_held, "prefetch_expired": self.prefetch_expired,
            "host_computed": self.host_computed, "host_behind": self.host_behind,
            "layer_hits": list(self.layer_hits), "layer_misses": list(self.layer_misses),
        }

    def verify(self) -> None:
        """RuntimeError with a state dump when the table or the cache's own bookkeeping is inconsistent."""
        self.table.verify()
        problems = []
        for l in range(self.table.num_layers):
            resident = set(self.table.resident(l).tolist())
            if not self._pinned[l] <= resident:
                problems.append(f"layer {l}: pinned {sorted(self._pinned[l] - resident)} not resident")
            if not self._unused_prefetch[l] <= resident:
                problems.append(f"layer {l}: prefetched {sorted(self._unused_prefetch[l] - resident)} not resident")
        if problems:
            raise RuntimeError("ExpertCache invariant broken:\n  " + "\n  ".join(problems) + "\n"
                               + self.table.dump())

    # ---- internals -----------------------------------------------------------------------------------------
    def _load(self, layer: int, expert: int, kind: str, candidates: list[int] | None) -> Load:
        evicted = -1
        if self.table.free_slot(layer) < 0:
            evicted = self.policy.victim(layer, candidates, self.view)
            if evicted not in candidates:
                raise RuntimeError(
                    f"policy {self.policy.name!r} chose victim {evicted!r} at layer {layer} (step {self._step}) "
                    f"for {kind} of expert {expert}, but the evictable experts are {candidates}; pinned "
                    f"{sorted(self._pinned[layer])}\n{self.table.dump()}")
            candidates.remove(evicted)
            slot = self._evict(layer, evicted, replace_with=expert)
        else:
            slot = self.table.assign_free(layer, expert)
        self._arrived[layer][expert] = False
        self.policy.on_load(layer, expert, kind)
        return Load(layer, expert, slot, kind, evicted)

    def _evict(self, layer: int, expert: int, replace_with: int = -1) -> int:
        """Evict `expert` (and put `replace_with` into its slot when ≥ 0); returns the slot."""
        # The cache-level guard for "never evict what the current layer needs": candidates exclude pins, and
        # this re-check catches any future code path that forgets to.
        if expert in self._pinned[layer]:
            raise RuntimeError(f"evicting pinned expert {expert} at layer {layer}\n{self.table.dump()}")
        if replace_with >= 0:
            slot = self.table.replace(layer, expert, replace_with)
        else:
            slot = self.table.evict(layer, expert)
        self.evictions += 1
        unused = self._unused_prefetch[layer]
        if unused and expert in unused:
            unused.discard(expert)
            self.prefetch_wasted += 1
        return slot

    def _evictable(self, layer: int, exclude: Sequence[int]) -> list[int]:
        pins = self._pinned[layer]
        return [e for e in self.table.expert_row(layer)
                if e >= 0 and e not in pins and e not in exclude]

    def _issue(self, requests: list[Prefetch] | None) -> list[Load]:
        if not requests:
            return []
        if self.hold_prefetches:
            return self._hold(requests)
        by_layer: dict[int, list[int]] = {}
        for layer, expert in requests:
            by_layer.setdefault(int(layer), []).append(int(expert))
        loads = []
        for layer, exps in by_layer.items():
            loads += self.prefetch(layer, list(dict.fromkeys(exps)))
        return loads

    def _hold(self, requests: list[Prefetch]) -> list[Load]:
        """hold_prefetches: requests for a later layer are loaded while the routed layer's idle copy time lasts
        (`_spare`), the rest are held for plan_layer to hand out (route(..., fill=))."""
        loads = []
        for layer, expert in requests:
            key = (int(layer), int(expert))
            if self._spare > 0 and key[0] > self._layer and key not in self._held:
                got = self.prefetch(key[0], [key[1]])
                self._spare -= len(got)
                loads += got
            elif key not in self._held:
                self._held[key] = None
                self.prefetch_held += 1
        return loads

    def _validate(self, layer: int, experts: Sequence[int], what: str) -> list[int]:
        L, E = self.table.num_layers, self.table.num_experts
        if not 0 <= layer < L:
            raise ValueError(f"{what}: layer={layer} out of range [0, {L})")
        exps = [int(e) for e in experts]
        if exps and (min(exps) < 0 or max(exps) >= E):
            raise ValueError(f"{what}: experts {exps} at layer {layer} must lie in [0, {E})")
        if len(set(exps)) != len(exps):
            raise ValueError(f"{what}: experts {exps} at layer {layer} must be unique (pass the union)")
        return exps

    def _validate_require(self, layer: int, experts: Sequence[int]) -> list[int]:
        if self._step < 0:
            raise ValueError("require(): call begin_step() first")
        exps = self._validate(layer, experts, "require")
        if layer < self._layer:
            raise ValueError(f"require(layer={layer}) after layer {self._layer} in step {self._step}: layers go in "
                             f"increasing order; call begin_step() for the next step")
        S = self.table.slots_per_layer
        if len(exps) > S:
            raise ValueError(f"require(): {len(exps)} experts needed at layer {layer} but only {S} slots per "
                             f"layer; raise slots_per_layer to ≥ {len(exps)} or split them into passes of ≤ {S}")
        held = self._pinned[layer].difference(exps)
        if len(held) + len(exps) > S:
            raise ValueError(f"require(): layer {layer} still pins {len(held)} experts from an earlier pass; call "
                             f"release({layer}) before requiring {len(exps)} more")
        return exps

    def _pad_history(self, index: int) -> None:
        # Layers or steps never routed get empty entries so index step * L + layer stays valid.
        while len(self._hist_off) - 1 < index:
            self._hist_off.append(len(self._hist))

    def _routed(self, step: int, layer: int) -> np.ndarray | None:
        i = step * self.table.num_layers + layer
        if not 0 <= layer < self.table.num_layers or not 0 <= i < len(self._hist_off) - 1:
            return None
        return np.array(self._hist[self._hist_off[i]:self._hist_off[i + 1]], dtype=np.int32)
