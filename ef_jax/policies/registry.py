"""Policy registry: the one place a name (OffloadConfig, `ef-jax sim --policy`) becomes a Policy object.

name | PolicySpec(name, **kw) | Policy object → get_policy(spec, context) → factory.from_context(context, **kw)

A policy that needs the model (routers, norms, embeddings) or the future (Belady) reads it from the PolicyContext
that the engine or the simulator hands over; it never reaches into a model or a device array itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ef_jax.policies.base import Policy, PolicyContext
from ef_jax.policies.belady import Belady
from ef_jax.policies.classic import LFU, LRU, NoCache
from ef_jax.policies.expertflow import ExpertFlow
from ef_jax.policies.predictive import Predictive
from ef_jax.policies.pregate import Pregate

POLICIES: dict[str, type] = {
    "nocache": NoCache,
    "lru": LRU,
    "lfu": LFU,
    "belady": Belady,          # needs the future routing: simulator only
    "pregate": Pregate,        # model-bound (routers + hidden states): engine only
    "predictive": Predictive,  # ExpertFlow predictive cache (arXiv 2410.17954)
    "expertflow": ExpertFlow,  # model-bound, adaptive horizon (arXiv 2510.26730): engine only
}
ENGINE_ONLY = frozenset({"pregate", "expertflow"})   # need hidden states
SIMULATOR_ONLY = frozenset({"belady"})                # needs the whole future


@dataclasses.dataclass(frozen=True, eq=False)
class PolicySpec:
    """A registered policy name with constructor arguments, built when the run's context is known:
    `OffloadConfig(policy=PolicySpec("expertflow", min_precision=0.9))`."""
    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __init__(self, name: str, **kwargs: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", kwargs)


def register_policy(name: str, factory: type) -> None:
    """Make `factory.from_context(context, **kw)` available as get_policy(name, context, **kw)."""
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered")
    POLICIES[name] = factory


def policy_names(where: str | None = None) -> list[str]:
    """Registered names; where="engine" or "simulator" lists only the ones that run there."""
    skip = {"engine": SIMULATOR_ONLY, "simulator": ENGINE_ONLY}.get(where, frozenset())
    return sorted(n for n in POLICIES if n not in skip)


def policy_label(spec: "str | PolicySpec | Policy") -> str:
    """The name a spec will report, without building it."""
    if isinstance(spec, str):
        return spec.lower()
    return spec.name


def get_policy(spec: "str | PolicySpec | Policy", context: PolicyContext | None = None, **kw) -> Policy:
    """A fresh policy for a registered name or PolicySpec (kw go to its constructor), or the Policy object itself."""
    if isinstance(spec, PolicySpec):
        if kw:
            raise TypeError(f"keyword arguments {sorted(kw)} conflict with a PolicySpec; put them in the spec")
        spec, kw = spec.name, dict(spec.kwargs)
    if isinstance(spec, str):
        factory = POLICIES.get(spec.lower())
        if factory is None:
            raise ValueError(f"unknown policy {spec!r}; valid names: {', '.join(policy_names())}")
        return factory.from_context(context, **kw)
    if isinstance(spec, Policy):
        if kw:
            raise TypeError(f"keyword arguments {sorted(kw)} only apply when the policy is given by name")
        return spec
    raise TypeError(f"policy must be a name ({', '.join(policy_names())}), a PolicySpec or a Policy object, "
                    f"got {type(spec).__name__}")
