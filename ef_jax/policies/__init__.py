"""Expert eviction / prefetch policies: small strategy objects driven by ef_jax.cache.ExpertCache."""
from ef_jax.policies.base import BasePolicy, Policy, Prefetch
from ef_jax.policies.belady import Belady
from ef_jax.policies.classic import LFU, LRU, NoCache
from ef_jax.policies.pregate import Pregate
from ef_jax.policies.registry import POLICIES, get_policy, policy_names, register_policy

__all__ = ["BasePolicy", "Policy", "Prefetch", "Belady", "LFU", "LRU", "NoCache", "POLICIES", "Pregate", "get_policy",
           "policy_names", "register_policy"]
