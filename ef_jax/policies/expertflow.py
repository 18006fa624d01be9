"""ExpertFlow adaptive prefetching (arXiv 2510.26730): pre-gate predictions S layers ahead, with S sized from
measured bandwidth and compute, corrected online from prefetch feedback; eviction aligned with the predictions.

[on_measure] → EMA copy time E_s/C_s, layer compute T_l      [on_access / on_route] → fetch fraction, late, unused
[on_hidden(j, h)] → S = lag + ceil(g · N_e · E_s / (C_s · T_l)) clipped to [1, max_horizon] (see `horizon`)
                  → predictor scores for layers j+1..j+S (attention point; from a layer's output: j+2..j+1+…,
                    j+1 when S = 1) → top-k per row → each predicted expert
                    is prefetched when the predictor's measured precision at its (distance, rank) reaches the
                    break-even precision u/(1+u) of the copy stream (u = copies per layer of compute); the rest
                    are recorded to keep measuring precision. Nearer layers refine farther predictions.
[on_scores(j, s)] → the same from pre-gate scores the engine computed on the device (plain pre-gating only)
[on_step_start]   → the new tokens' embeddings stand in for the hidden state of layer −1: layers 0..S−1
[victim(layer)]   → an expert not predicted for that layer (lowest decayed use count, then LRU) before a predicted one
[on_step_end]     → g ← g · exp(η (late − λ unused) / prefetches)   (late → look further ahead, unused → nearer)

Axes: B batch rows, D model, E experts per layer, K top-k, L MoE layers, j/t MoE layer indices (source/target).

Where h comes from (`point`): by default the residual after layer j's attention — the experts' input, shown as
soon as j's demand loads are queued — so a prediction for j+1 has layer j's expert compute to arrive in (lag 0).
From layer j's output (point="moe", lag 1) predictions are a little more accurate at equal distance but one
expert compute later. On the default model the attention point stalled less (docs/expertflow.md).

N_e (experts a layer must fetch) = the measured fraction of needed experts that came from the host (misses plus
used prefetches, an EMA) × the size of the batch's predicted union for the next layer — so at batch > 1 it grows
with how diverse the batch's predicted routes are, the quantity the paper estimates from embedding diversity.
The predictor is plain pre-gating (each later layer's router on the current hidden state) unless a hybrid
predictor (ef_jax.hybrid) is given. Runs in the engine only: the simulator has no hidden states.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ef_jax.policies.base import BasePolicy, PolicyContext, Recency, require_model_context
from ef_jax.policies.pregate import PregateScorer


class ExpertFlow(BasePolicy):
    """Adaptive-horizon pre-gate prefetching with prediction-aligned eviction.

    Args:
        routers, norms, top_k, eps: the pre-gate scorer's inputs (the registry passes them from the PolicyContext).
        max_horizon: upper bound on S (layers ahead).
        horizon: a fixed S (disables adaptation; for ablations).
        ema: weight of a new measurement in the moving estimates.
        gain_rate: η, step size of the feedback correction; unused_weight: λ.
        min_precision: the least precision (EMA per distance and rank) a prediction needs to be prefetched; the
            policy raises it to the break-even point of a saturated copy stream (see `precision_floor`).
        predictor: an object with `scores(layer, hidden, targets, context)` (default: pre-gating); a hybrid
            predictor from ef_jax.hybrid fits here.
        decay: per-step decay of the use counts that order evictions (1: all-time LFU).
        embed: the token embedding table [V, D], host numpy (from the PolicyContext): at step start the new tokens' embeddings
            act as the hidden state of "layer −1", so the first layers get predictions too.
        point: where the engine shows hidden states: "attention" (layer j's residual after attention, the
            experts' input, as soon as j's demand loads are issued) or "moe" (layer j's output, after its
            experts). The attention point predicts layer j+s one layer's expert compute earlier, a little less
            accurately; it stalled less on both presets (docs/expertflow.md). None: the predictor's own point
            (a hybrid head runs at the point its record was taken at), else "attention".
    """
    name = "expertflow"
    wants_hidden = True

    def __init__(self, routers=None, norms=None, *, top_k: int = 0, eps: float = 1e-6, max_horizon: int = 8,
                 horizon: int | None = None, ema: float = 0.1, gain_rate: float = 0.5, unused_weight: float = 1.0,
                 min_precision: float = 0.3, decay: float = 0.97, predictor=None, embed=None,
                 point: str | None = None):
        if routers is None or norms is None:
            require_model_context(self.name, None)
        self.top_k, self.eps = top_k, eps
        if not isinstance(max_horizon, int) or max_horizon < 1:
            raise ValueError(f"max_horizon={max_horizon!r} must be a positive int")
        if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"horizon={horizon!r} must be None (adaptive) or a positive int")
        if not 0 < ema <= 1:
            raise ValueError(f"ema={ema} must be in (0, 1]")
        self.max_horizon, self.fixed_horizon = max_horizon, horizon
        self.ema, self.gain_rate, self.unused_weight = ema, gain_rate, unused_weight
        if not 0 <= min_precision <= 1.01:
            raise ValueError(f"min_precision={min_precision} must be in [0, 1]")
        self.min_precision = min_precision
        self.predictor = predictor if predictor is not None else PregateScorer(routers, norms, eps)
        self.embed = None if embed is None else np.asarray(embed)  # host copy: a policy never indexes device arrays
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay} must be in (0, 1] (1 = all-time use counts)")
        self.decay = decay
        if point not in (None, "moe", "attention"):
            raise ValueError(f"point={point!r} must be 'moe' (predict from a layer's output) or 'attention' (from "
                             "its MoE input, one layer's experts earlier), or None (the predictor's own)")
        fixed = self.predictor.hidden_point  # a trained predictor knows which states it learned from (None: any)
        if point is not None and fixed is not None and point != fixed:
            raise ValueError(f"point={point!r}, but the predictor {type(predictor).__name__} was trained on hidden "
                             f"states at point {fixed!r}: leave point=None or record and train at {point!r}")
        self.hidden_point = point or fixed or "attention"

    @classmethod
    def from_context(cls, context: PolicyContext | None, **kw) -> "ExpertFlow":
        ctx = require_model_context(cls.name, context)
        return cls(ctx.routers, ctx.norms, top_k=ctx.top_k, eps=ctx.eps, embed=kw.pop("embed", ctx.embed), **kw)

    # ---- state ------------------------------------------------------------------------------------------------
    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        self.recency = Recency(num_layers, num_experts)
        self.copy_s: float | None = None    # EMA: seconds one expert copy occupies the copy stream (E_s / C_s)
        self.copy_bytes = 0                 # E_s
        self.layer_s: float | None = None   # EMA: T_l, one MoE layer's compute on the critical path
        self.fetch_frac = 1.0               # EMA: fraction of a layer's needed experts that came from the host
        self.union = float(self.top_k)      # EMA: predicted distinct experts per layer for the batch
        self.gain = 1.0                     # g, the feedback correction of S
        self.hit_rate = 0.0                 # EMA of needed experts found arrived
        self.horizons: list[int] = []       # S at each on_hidden (for mean_horizon)
        self.token_ids = None
        self._pred = [{} for _ in range(num_layers)]           # per target: {distance: predicted experts}
        self._pred_step = [-1] * num_layers                    # the step those predictions belong to
        self._live = [set() for _ in range(num_layers)]        # prefetched predictions, protected from eviction
        # precision[s][r]: EMA over predictions at distance s and rank r (0 = the top score) of "it was needed"
        self.precision = [[None] * self.top_k for _ in range(self.max_horizon + 2)]
        self._prefetched = [set() for _ in range(num_layers)]  # prefetched for the target's next route
        self._fetched = 0                                      # this layer: needed experts that came from the host
        self.late = self.unused = self.used = 0                # this step's feedback
        self.totals = {"late": 0, "unused": 0, "used": 0, "predicted": 0}
        self._deferred: list[tuple[int, int]] = []  # prefetches held back until the next layer's demand loads
        self._freq = np.zeros((num_layers, num_experts))  # f[L, E]: decayed use count (eviction order)

    @property
    def num_fetch(self) -> float:
        """N_e: expected experts a layer must fetch (batch union of predictions × measured fetch fraction)."""
        return self.fetch_frac * self.union

    @property
    def lead_layers(self) -> float:
        """g · N_e · E_s / (C_s · T_l): layers of compute the copies of one layer's experts take (∞ unmeasured)."""
        if self.copy_s is None or not self.layer_s:
            return math.inf
        return self.gain * self.num_fetch * self.copy_s / self.layer_s

    @property
    def horizon(self) -> int:
        """S, clipped to [1, max_horizon]; 1 until both times are measured.

        The hidden state of layer j is seen when layer j ends, so a prediction for layer j+s has s−1 layers of
        compute (plus layer j+s's attention) to arrive in: S = 1 + ceil(lead_layers). Copies shorter than a tenth
        of a layer hide behind the next layer's attention: S = 1.
        """
        if self.fixed_horizon is not None:
            return min(self.fixed_horizon, max(self.num_layers - 1, 1))
        raw = self.lead_layers
        if math.isinf(raw):
            return 1
        # from the attention point a prediction for layer j+s has s whole layers of compute to arrive in
        lag = 0 if self.hidden_point == "attention" else 1
        S = 1 if raw < 0.1 else lag + math.ceil(raw - 1e-9)
        return int(min(max(S, 1), self.max_horizon))

    @property
    def mean_horizon(self) -> float:
        return float(np.mean(self.horizons)) if self.horizons else float("nan")

    def prefetch_distance(self) -> float:
        return self.mean_horizon

    # ---- measurements ------------------------------------------------------------------------------------------
    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ema) * old + self.ema * new

    def on_measure(self, *, layer_compute_s=None, copy_s=None, copy_bytes=None) -> None:
        if layer_compute_s is not None and layer_compute_s >= 0:
            self.layer_s = self._avg(self.layer_s, layer_compute_s)
        if copy_s is not None and copy_s >= 0:
            self.copy_s = self._avg(self.copy_s, copy_s)
            self.copy_bytes = copy_bytes or self.copy_bytes

    # ---- feedback ----------------------------------------------------------------------------------------------
    def on_step_start(self, step: int, token_ids, view) -> list:
        self.token_ids = None if token_ids is None else np.asarray(token_ids)
        if self.embed is None or self.token_ids is None:
            return []
        x0 = np.asarray(self.embed[self.token_ids.reshape(-1)], np.float32)  # [B, D]: rows of the host table
        score = lambda targets, context: self.predictor.scores(-1, x0, targets, context)
        return self._issue_or_defer(self._predict(-1, score, view), -1)

    def on_load(self, layer: int, expert: int, kind: str) -> None:
        if kind == "prefetch":  # a prefetched expert enters as most recent
            self.recency.touch(layer, expert)
            self._prefetched[layer].add(expert)

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)
        self._freq[layer, expert] += 1.0
        self.hit_rate += 0.01 * (float(hit) - self.hit_rate)
        mine = self._prefetched[layer]
        if expert in mine:
            mine.discard(expert)
            self.used += 1
            self._fetched += 1
            if not hit:
                self.late += 1  # needed but still in flight: the prefetch started too late
        elif not hit:
            self._fetched += 1

    def on_route(self, layer: int, experts: Sequence[int], view) -> list:
        self._freq[layer] *= self.decay  # once per layer and step: an EMA of each expert's use rate
        mine = self._prefetched[layer]
        self.unused += len(mine)  # prefetched for this layer, not needed by it
        mine.clear()
        if self._pred_step[layer] == view.step:
            need = {int(e) for e in experts}
            for dist, ranked in self._pred[layer].items():
                prec = self.precision[dist]
                for e, r in ranked.items():
                    prec[r] = self._avg(prec[r], float(e in need))
        self._pred[layer], self._live[layer], self._pred_step[layer] = {}, set(), -1
        if experts:
            self.fetch_frac = self._avg(self.fetch_frac, self._fetched / len(experts))
        self._fetched = 0
        out = [(t, e) for t, e in self._deferred if t > layer]
        self._deferred = []
        return out  # the cache issues them after this layer's demand loads

    def feedback(self, late: int, unused: int, used: int) -> None:
        """g ← g · exp(η (late − λ unused) / issued): late prefetches push S up, unused ones pull it down."""
        issued = late + unused + used
        if issued:
            self.gain *= math.exp(self.gain_rate * (late - self.unused_weight * unused) / issued)
            self.gain = min(max(self.gain, 1 / 16), 16.0)

    def on_step_end(self, step: int, view) -> list:
        self._deferred = []
        for k, v in (("late", self.late), ("unused", self.unused), ("used", self.used)):
            self.totals[k] += v
        self.feedback(self.late, self.unused, self.used)
        self.late = self.unused = self.used = 0
        return []

    # ---- prediction and prefetch -------------------------------------------------------------------------------
    @property
    def device_scorer(self) -> PregateScorer | None:
        """Plain pre-gating runs on the device in the layer mode (a hybrid head scores on the host there; the
        device step runs it inside its program: ef_jax.engine.programs.device_hybrid)."""
        return self.predictor if type(self.predictor) is PregateScorer else None

    def on_hidden(self, layer: int, hidden: np.ndarray, view) -> list[tuple[int, int]]:
        last = hidden[:, -1] if hidden.ndim == 3 else hidden  # [B, D]: the newest position of every row
        score = lambda targets, context: self.predictor.scores(layer, last, targets, context)
        return self._issue_or_defer(self._predict(layer, score, view), layer)

    def on_scores(self, layer: int, scores: np.ndarray, view) -> list[tuple[int, int]]:
        """on_hidden with the pre-gate logits already computed on the device: scores f32[L, B, E]."""
        return self._issue_or_defer(self._predict(layer, lambda targets, context: {t: scores[t] for t in targets},
                                                  view), layer)

    def _issue_or_defer(self, requests: list[tuple[int, int]], layer: int) -> list[tuple[int, int]]:
        """The copy stream is FIFO: a prefetch issued now would queue in front of the next layer's demand loads,
        which are routed a moment later and are needed first. Predictions for layer j+2 and beyond are therefore
        handed to the cache from on_route(j+1), behind its demand loads; they still have layer j+1's compute to
        arrive in. Distance-1 requests (S = 1, or from the attention point, where layer j's experts still have
        to compute) go now."""
        if self.horizon < 2 and self.hidden_point == "moe":
            return requests
        # From the attention point with S = 1, the step-start (embedding) predictions for layer 0 are not copied:
        # layer 0 is routed at once, so a copy could not beat its demand load. They still count: recorded, they
        # keep the predicted experts from being evicted by layer 0's demand loads (measured: copying them raised
        # stall from 4.06 to 4.34 ms per token at 25 % on h100-measured). on_route(0) drops them.
        now = [(t, e) for t, e in requests if t == layer + 1 and layer >= 0 and self.hidden_point == "attention"]
        self._deferred += [r for r in requests if r not in now]
        return now

    @property
    def precision_floor(self) -> float:
        """Break-even precision of one prefetch. With u = N_e·E_s/(C_s·T_l) copies per layer of compute, a right
        prefetch hides at most 1/u of a copy behind compute; a wrong one costs its copy plus, through the expert
        it evicted, another one with probability h (the hit rate): prefetch when p/u ≥ (1 − p)(1 + h), i.e.
        p ≥ w / (1 + w) with w = u (1 + h); never below min_precision."""
        if self.copy_s is None or not self.layer_s:
            return self.min_precision
        w = self.num_fetch * self.copy_s / self.layer_s * (1 + self.hit_rate)
        return max(self.min_precision, w / (1 + w))

    @property
    def prefetch_cap(self) -> int:
        """Prefetches worth issuing per layer boundary: the copies one layer of compute can hide (at least 1)."""
        if self.copy_s is None or not self.layer_s or self.copy_s <= 0:
            return self.num_experts
        return max(1, math.ceil(self.layer_s / self.copy_s - 1e-9))

    def _predict(self, layer: int, score, view) -> list[tuple[int, int]]:
        """Predictions from MoE layer `layer`'s hidden state (−1: the embeddings). score(targets, context) →
        {target layer: logits f32[B, E]}: the predictor on that state, or the device's precomputed scores."""
        S = self.horizon
        self.horizons.append(S)
        step = view.step
        # from a layer's output, distance 1 leaves only the next attention to copy in: useless once S ≥ 2; from
        # the attention point it has the layer's expert compute (the embeddings of step start count as an output)
        first = 1 if S < 2 or (self.hidden_point == "attention" and layer >= 0) else 2
        targets = list(range(layer + first, min(layer + 1 + S, self.num_layers)))
        if not targets:
            return []
        context = {"step": step, "token_ids": self.token_ids, "view": view}
        scores = score(targets, context)
        floor, K = self.precision_floor, self.top_k
        cand = []  # (precision, target, expert) of every prediction that clears the floor
        for t in targets:
            dist = t - layer
            top = np.argsort(-scores[t], axis=-1, kind="stable")[:, :K]  # [B, K], rank order
            ranked: dict[int, int] = {}
            for r in range(K):
                for e in top[:, r].tolist():
                    ranked.setdefault(e, r)
            if dist == first:
                self.union = self._avg(self.union, len(ranked))
            if self._pred_step[t] != step:
                self._pred[t], self._live[t], self._pred_step[t] = {}, set(), step
            self._pred[t][dist] = ranked
            self.totals["predicted"] += len(ranked)
            prec = self.precision[dist]
            cand += [(1.0 if prec[r] is None else prec[r], t, e) for e, r in ranked.items()
                     if prec[r] is None or prec[r] >= floor]
        cand.sort(key=lambda c: (-c[0], c[1], c[2]))  # most reliable first, then nearest
        out = []
        cap = self.prefetch_cap
        for _, t, e in cand:
            if view.is_resident(t, e):
                self._live[t].add(e)  # already here: protect it from eviction, no copy
            elif len(out) < cap:
                self._live[t].add(e)
                out.append((t, e))
        return out

    def predicts_reuse(self, layer: int, expert: int, view) -> bool:
        """Its own eviction order keeps `expert`: its decayed use count ranks among the layer's top S."""
        freq = self._freq[layer]
        return int((freq > freq[expert]).sum()) < self.slots_per_layer

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        """Unpredicted experts go first; among them the lowest decayed use count (on the default model's routing
        traces this beat both LRU and all-time LFU at 25 % and 50 % budgets), ties by least recent."""
        live = self._live[layer] if self._pred_step[layer] == view.step and layer > view.layer else ()
        free = [e for e in candidates if e not in live] or list(candidates)
        freq, last = self._freq[layer], self.recency.last[layer]
        return min(free, key=lambda e: (freq[e], last[e]))

    def __repr__(self) -> str:
        mode = f"horizon={self.fixed_horizon}" if self.fixed_horizon else f"max_horizon={self.max_horizon}"
        return f"ExpertFlow({mode}, predictor={type(self.predictor).__name__})"
