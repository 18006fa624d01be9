"""SlotTable: which expert sits in which device slot, per MoE layer (host-side numpy state).

[ExpertCache decides] → assign / evict → SlotTable → slot_row(layer) → (the engine passes it to the layer's expert
compute as its slot map i32[E])

Axes: L MoE layers, E experts per layer, S device slots per layer.

The table is the host's single source of truth for residency. It only records placement; it never decides
anything (that is `ExpertCache` + a policy). Both directions are stored so lookups are O(1) either way, and
`verify()` checks that they agree. The maps are kept as nested Python lists because the scheduler reads them
one element at a time (several times per expert access, millions of times per trace replay) and a list lookup
is ~5x cheaper than indexing a numpy array from Python; `slot_of_expert`, `expert_of_slot` and `snapshot()`
hand out numpy copies.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np


class SlotSnapshot(NamedTuple):
    """An immutable copy of the table; a NamedTuple, so JAX treats it as a pytree of two leaves."""
    slot_of_expert: np.ndarray  # i32[L, E], -1 = not resident
    expert_of_slot: np.ndarray  # i32[L, S], -1 = free slot


class SlotTable:
    """Per-layer expert ↔ slot map with S slots per layer.

    Args:
        num_layers: L, number of MoE layers.
        num_experts: E, routed experts per layer.
        slots_per_layer: S, device slots per layer (1 ≤ S ≤ E).
    """

    def __init__(self, num_layers: int, num_experts: int, slots_per_layer: int):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts),
                        ("slots_per_layer", slots_per_layer)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if slots_per_layer > num_experts:
            raise ValueError(f"slots_per_layer={slots_per_layer} exceeds num_experts={num_experts}; "
                             f"use at most {num_experts} slots (every expert resident)")
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.slots_per_layer = int(slots_per_layer)
        self._soe = [[-1] * num_experts for _ in range(num_layers)]        # int[L][E]: slot, -1 = not resident
        self._eos = [[-1] * slots_per_layer for _ in range(num_layers)]    # int[L][S]: expert, -1 = free
        self._free = [list(range(slots_per_layer)) for _ in range(num_layers)]   # per layer: min-heap of free slots

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def slot_of_expert(self) -> np.ndarray:
        """i32[L, E] copy: slot of each expert, -1 = not resident."""
        return np.array(self._soe, np.int32)

    @property
    def expert_of_slot(self) -> np.ndarray:
        """i32[L, S] copy: expert in each slot, -1 = free."""
        return np.array(self._eos, np.int32)

    def slot_row(self, layer: int) -> list[int]:
        """The live slot-of-expert list of `layer` (int[E], -1 = absent). Read it, never write it."""
        return self._soe[layer]

    def expert_row(self, layer: int) -> list[int]:
        """The live expert-of-slot list of `layer` (int[S], -1 = free). Read it, never write it."""
        return self._eos[layer]

    def slot(self, layer: int, expert: int) -> int:
        """Slot of `expert` at `layer`, or -1 when it is not resident."""
        return self._soe[layer][expert]

    def is_resident(self, layer: int, expert: int) -> bool:
        return self._soe[layer][expert] >= 0

    def resident(self, layer: int) -> np.ndarray:
        """i32[n ≤ S]: the experts resident at `layer`, ascending."""
        return np.array(sorted(e for e in self._eos[layer] if e >= 0), np.int32)

    def num_resident(self, layer: int) -> int:
        return self.slots_per_layer - len(self._free[layer])

    def free_slot(self, layer: int) -> int:
        """Lowest free slot at `layer`, or -1 when all S slots are taken."""
        free = self._free[layer]
        return free[0] if free else -1

    # ---- mutations -----------------------------------------------------------------------------------------
    def assign(self, layer: int, expert: int, slot: int) -> None:
        """Place `expert` into the free `slot` of `layer`."""
        self._check(layer, expert=expert, slot=slot)
        held = self._eos[layer][slot]
        if held >= 0:
            raise ValueError(f"slot {slot} of layer {layer} holds expert {held}; evict it before assigning "
                             f"expert {expert}")
        old = self._soe[layer][expert]
        if old >= 0:
            raise ValueError(f"expert {expert} of layer {layer} is already resident in slot {old}; evict it first")
        free = self._free[layer]
        free.remove(slot)           # S is small (≤ E), so a linear remove + heapify is cheap
        heapq.heapify(free)
        self._soe[layer][expert] = slot
        self._eos[layer][slot] = expert

    def assign_free(self, layer: int, expert: int) -> int:
        """Place `expert` into the lowest free slot of `layer`; returns the slot. ValueError when none is free."""
        self._check(layer, expert=expert)
        if self._soe[layer][expert] >= 0:
            raise ValueError(f"expert {expert} of layer {layer} is already resident; evict it first")
        free = self._free[layer]
        if not free:
            raise ValueError(f"layer {layer} has no free slot (all {self.slots_per_layer} taken); evict one first")
        slot = heapq.heappop(free)
        self._soe[layer][expert] = slot
        self._eos[layer][slot] = expert
        return slot

    def evict(self, layer: int, expert: int) -> int:
        """Remove resident `expert` from `layer`; returns the slot it freed."""
        self._check(layer, expert=expert)
        slot = self._soe[layer][expert]
        if slot < 0:
            raise ValueError(f"expert {expert} of layer {layer} is not resident; nothing to evict")
        self._soe[layer][expert] = -1
        self._eos[layer][slot] = -1
        heapq.heappush(self._free[layer], slot)
        return slot

    def replace(self, layer: int, old: int, new: int) -> int:
        """Evict resident `old` and put absent `new` into its slot (the cache's hot path); returns the slot."""
        self._check(layer, expert=new)
        soe = self._soe[layer]
        slot = soe[old] if 0 <= old < self.num_experts else -1
        if slot < 0:
            raise ValueError(f"expert {old} of layer {layer} is not resident; nothing to replace")
        if soe[new] >= 0:
            raise ValueError(f"expert {new} of layer {layer} is already resident in slot {soe[new]}")
        soe[old] = -1
        soe[new] = slot
        self._eos[layer][slot] = new
        return slot

    def clear(self, layer: int | None = None) -> None:
        """Evict everything (at one layer, or at all layers)."""
        layers = range(self.num_layers) if layer is None else [layer]
        for l in layers:
            self._soe[l] = [-1] * self.num_experts
            self._eos[l] = [-1] * self.slots_per_layer
            self._free[l] = list(range(self.slots_per_layer))

    # ---- export / import -----------------------------------------------------------------------------------
    def snapshot(self) -> SlotSnapshot:
        """Both maps as fresh numpy arrays (for tests, dumps and replay comparisons)."""
        return SlotSnapshot(self.slot_of_expert, self.expert_of_slot)

    @classmethod
    def from_snapshot(cls, snap: SlotSnapshot) -> "SlotTable":
        """Rebuild a table from a snapshot (verified: a corrupt snapshot raises RuntimeError)."""
        soe, eos = np.asarray(snap[0]), np.asarray(snap[1])
        if soe.ndim != 2 or eos.ndim != 2 or soe.shape[0] != eos.shape[0]:
            raise ValueError(f"snapshot shapes slot_of_expert {soe.shape}, expert_of_slot {eos.shape} must be "
                             f"[L, E] and [L, S] with the same L")
        table = cls(soe.shape[0], soe.shape[1], eos.shape[1])
        table._soe = soe.astype(int).tolist()
        table._eos = eos.astype(int).tolist()
        table._free = [np.flatnonzero(eos[l] < 0).tolist() for l in range(eos.shape[0])]
        table.verify()
        return table

    # ---- invariants ----------------------------------------------------------------------------------------
    def verify(self) -> None:
        """RuntimeError with a compact dump unless both maps agree and every count is within S."""
        problems = []
        L, E, S = self.num_layers, self.num_experts, self.slots_per_layer
        soe, eos = self.slot_of_expert, self.expert_of_slot
        if soe.shape != (L, E) or eos.shape != (L, S):
            problems.append(f"shapes {soe.shape} / {eos.shape}, expected {(L, E)} / {(L, S)}")
        else:
            if ((soe < -1) | (soe >= S)).any():
                problems.append("slot_of_expert has values outside [-1, S)")
            if ((eos < -1) | (eos >= E)).any():
                problems.append("expert_of_slot has values outside [-1, E)")
        for l in range(L) if not problems else ():
            experts = np.flatnonzero(soe[l] >= 0)
            slots = np.flatnonzero(eos[l] >= 0)
            if len(experts) > S:
                problems.append(f"layer {l}: {len(experts)} resident experts > S={S}")
            if len(np.unique(soe[l, experts])) != len(experts):
                problems.append(f"layer {l}: two experts share a slot")
            bad_fwd = experts[eos[l, soe[l, experts]] != experts]
            bad_back = slots[soe[l, eos[l, slots]] != slots]
            if len(bad_fwd):
                problems.append(f"layer {l}: experts {bad_fwd.tolist()} point at slots that do not point back")
            if len(bad_back):
                problems.append(f"layer {l}: slots {bad_back.tolist()} hold experts that do not point back")
            if sorted(self._free[l]) != np.flatnonzero(eos[l] < 0).tolist():
                problems.append(f"layer {l}: free list {sorted(self._free[l])} disagrees with expert_of_slot")
        if problems:
            raise RuntimeError("SlotTable invariant broken:\n  " + "\n  ".join(problems) + "\n" + self.dump())

    def dump(self, max_layers: int = 8) -> str:
        """Compact text state: per layer, the expert in each slot (-1 = free) and the free list."""
        lines = [f"SlotTable L={self.num_layers} E={self.num_experts} S={self.slots_per_layer}"]
        for l in range(min(self.num_layers, max_layers)):
            lines.append(f"  layer {l}: slots {self._eos[l]} free {sorted(self._free[l])}")
        if self.num_layers > max_layers:
            lines.append(f"  ... {self.num_layers - max_layers} more layers")
        return "\n".join(lines)

    def _check(self, layer: int, *, expert: int | None = None, slot: int | None = None) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} out of range [0, {self.num_layers})")
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert={expert} out of range [0, {self.num_experts})")
        if slot is not None and not 0 <= slot < self.slots_per_layer:
            raise ValueError(f"slot={slot} out of range [0, {self.slots_per_layer})")
