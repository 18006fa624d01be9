"""Policy registry: a name (as used in OffloadConfig and `ef-jax sim --policy`) → a Policy object."""
from __future__ import annotations

from typing import Callable

from ef_jax.policies.base import Policy
from ef_jax.policies.belady import Belady
from ef_jax.policies.classic import LFU, LRU, NoCache
from ef_jax.policies.expertflow import ExpertFlow
from ef_jax.policies.predictive import Predictive
from ef_jax.policies.pregate import Pregate

POLICIES: dict[str, Callable[..., Policy]] = {
    "nocache": NoCache,
    "lru": LRU,
    "lfu": LFU,
    "belady": Belady,
    "pregate": Pregate,  # model-bound: the engine builds it with Pregate.from_model(model)
    "predictive": Predictive,  # ExpertFlow predictive cache (arXiv 2410.17954); from_model in the engine
    "expertflow": ExpertFlow,  # model-bound, adaptive horizon (arXiv 2510.26730)
}


def register_policy(name: str, factory: Callable[..., Policy]) -> None:
    """Make `factory(**kw)` available as get_policy(name, **kw)."""
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered")
    POLICIES[name] = factory


def policy_names() -> list[str]:
    return sorted(POLICIES)


def get_policy(name_or_obj: str | Policy, **kw) -> Policy:
    """A fresh policy for a registered name (kw go to its constructor), or the given Policy object itself."""
    if isinstance(name_or_obj, str):
        factory = POLICIES.get(name_or_obj.lower())
        if factory is None:
            raise ValueError(f"unknown policy {name_or_obj!r}; valid names: {', '.join(policy_names())}")
        return factory(**kw)
    if isinstance(name_or_obj, Policy):
        if kw:
            raise TypeError(f"keyword arguments {sorted(kw)} only apply when the policy is given by name")
        return name_or_obj
    raise TypeError(f"policy must be a name ({', '.join(policy_names())}) or a Policy object, "
                    f"got {type(name_or_obj).__name__}")
