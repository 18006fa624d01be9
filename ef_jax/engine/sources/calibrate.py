"""What the device step's policy is, and the copy/layer time ratio its adaptive horizon starts from.

OffloadConfig.policy (a name or PolicySpec) → device_policy_for → (DevicePolicy, fixed ratio or None)
  (expertflow's predictor= a HybridPredictor → DevicePolicy.head; hybrid_predictor hands its arrays to the source)
copy time of one expert (timed once: a pinned-host buffer of a few experts moved to the device)
  + one MoE layer's time (each step's wall time ÷ MoE layers, steps that compiled left out, an EMA)
  → RatioClock.ratio = E_s / (C_s · T_l), sent to the device when it moves by more than a quarter

Axes: L MoE layers, E experts.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ef_jax.engine.programs.device_hybrid import head_spec
from ef_jax.engine.programs.device_policies import DevicePolicy
from ef_jax.engine.telemetry.compile_time import compile_seconds
from ef_jax.policies.registry import PolicySpec

# per policy: the PolicySpec arguments the device runs (anything else is a host-only option: refused)
_ARGS = {"nocache": (), "lru": (), "lfu": (), "pregate": ("distance",),
         "expertflow": ("max_horizon", "horizon", "min_precision", "ratio", "predictor"),
         "predictive": ("prefetch", "horizon", "table_rows", "predictor")}
DEFAULT_MAX_HORIZON = 4  # device expertflow: layers ahead scored (each is a prefetch site in the program)


def device_policy_for(spec, top_k: int = 1, vocab: int = 0) -> tuple[DevicePolicy, float | None]:
    """(the DevicePolicy of a policy name or PolicySpec, a fixed ratio or None: calibrate). ValueError naming the
    fix for a policy or an argument the device step cannot run."""
    if isinstance(spec, PolicySpec):
        name, kw = spec.name.lower(), dict(spec.kwargs)
    elif isinstance(spec, str):
        name, kw = spec.lower(), {}
    else:
        raise ValueError(f"step='device' runs its policies as array operations inside the step program, by name "
                         f"({', '.join(_ARGS)}) or PolicySpec; the Policy object {spec!r} decides on the host: use "
                         "step='layer'")
    if name not in _ARGS:
        raise ValueError(f"step='device' runs the policies {tuple(_ARGS)} on the device; policy {name!r} decides "
                         "evictions on the host: use step='layer'")
    extra = sorted(set(kw) - set(_ARGS[name]))
    if extra:
        raise ValueError(f"PolicySpec({name!r}) arguments {extra} have no device version (it takes "
                         f"{list(_ARGS[name])}): drop them or use step='layer'")
    if name == "pregate":
        return DevicePolicy("pregate", max_horizon=int(kw.get("distance", 1))), None
    if name == "expertflow":
        fixed = kw.get("horizon")
        H = int(fixed or kw.get("max_horizon", DEFAULT_MAX_HORIZON))
        head = hybrid_predictor(spec)
        return DevicePolicy("expertflow", max_horizon=H, adaptive=fixed is None, gate=True,
                            min_precision=float(kw.get("min_precision", 0.3)),
                            head=None if head is None else head_spec(head, H)), kw.get("ratio")
    if name == "predictive":
        if kw.get("predictor", "online") != "online":  # its predictor is the on-device routing-path table
            raise ValueError("step='device' predicts with a routing-path table on the device (predictor='online'); "
                             "a trained predictor runs on the host: use step='layer'")
        rows = int(kw.get("table_rows", min(vocab, 8192)))
        return DevicePolicy("predictive", predict_m=int(kw.get("prefetch", top_k)),
                            predict_h=int(kw.get("horizon", 2)), table_rows=rows), None
    return DevicePolicy(name), None


def hybrid_predictor(spec):
    """expertflow's hybrid head (ef_jax.hybrid.HybridPredictor) when `spec` passes one as predictor=, else None.
    ValueError for any other predictor: only a predictor declaring `device_head` (the hybrid head: its arrays are
    what device_hybrid computes with) has a device version. (A capability, not a type check: ef_jax.hybrid sits
    above the engine.)"""
    pred = spec.kwargs.get("predictor") if isinstance(spec, PolicySpec) else None
    if pred is None:
        return None
    if not getattr(pred, "device_head", False):  # a predictor that declares nothing has no device version
        raise ValueError(f"PolicySpec('expertflow') arguments ['predictor'] have no device version for a "
                         f"{type(pred).__name__} (the device step runs a hybrid head, ef_jax.hybrid.HybridPredictor, "
                         "or plain pre-gating): drop predictor= or use step='layer'")
    return pred


def copy_seconds(bytes_per_expert: int, device_sharding, pinned_sharding, experts: int = 4, reps: int = 3) -> float:
    """Seconds one expert's host→device copy takes: a pinned buffer of `experts` experts moved `reps` times, the
    fastest / experts (a bandwidth measure: the in-program copies have no dispatch of their own)."""
    buf = jax.device_put(np.zeros(experts * bytes_per_expert, np.uint8), pinned_sharding)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.device_put(buf, device_sharding).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best / experts


class RatioClock:
    """The host half of the adaptive horizon: E_s / (C_s · T_l) from a timed copy and the steps' wall times."""

    def __init__(self, copy_s: float, moe_layers: int, ema: float = 0.1):
        self.copy_s, self.moe_layers, self.ema = copy_s, moe_layers, ema
        self.layer_s: float | None = None
        self.sent: float | None = None
        self._t = self._c = None

    def started(self) -> None:
        """A step was dispatched."""
        self._t, self._c = time.perf_counter(), compile_seconds()

    def finished(self) -> None:
        """The step's token was synced (the next step begins): its wall time counts unless it compiled."""
        if self._t is None:
            return
        dt, compiled = time.perf_counter() - self._t, compile_seconds() != self._c
        self._t = None
        if compiled or dt <= 0:
            return
        layer = dt / self.moe_layers
        self.layer_s = layer if self.layer_s is None else (1 - self.ema) * self.layer_s + self.ema * layer

    @property
    def ratio(self) -> float:
        return 0.0 if not self.layer_s else self.copy_s / self.layer_s

    def update(self) -> float | None:
        """A new ratio to send to the device, or None (it moved by less than a quarter)."""
        r = self.ratio
        if r > 0 and (self.sent is None or abs(r - self.sent) > 0.25 * self.sent):
            self.sent = r
            return r
        return None
