"""Host-side decisions of expert offloading: budget (and expert_memory="auto"'s arithmetic), slot table, expert
cache, timing model, routing rules.

Everything here is plain Python + numpy and imports no jax, flax or chex (tests/test_layout.py enforces it), so
the same objects drive the device engine (ef_jax/engine) and the trace-replay simulator (ef_jax/sim).
"""
from ef_jax.cache.auto_budget import AutoBudget, BudgetRequest, BudgetTooSmall
from ef_jax.cache.config import OffloadConfig, parse_bytes
from ef_jax.cache.expert_cache import CacheView, ExpertCache, Load
from ef_jax.cache.slot_table import SlotSnapshot, SlotTable

__all__ = ["AutoBudget", "BudgetRequest", "BudgetTooSmall", "CacheView", "ExpertCache", "Load", "OffloadConfig",
           "SlotSnapshot", "SlotTable", "parse_bytes"]
