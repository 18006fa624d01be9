"""Host-side expert offloading state: the slot table and the expert cache (pure Python + numpy, no device)."""
from ef_jax.offload.cache import CacheView, ExpertCache, Load
from ef_jax.offload.slot_table import SlotSnapshot, SlotTable

__all__ = ["CacheView", "ExpertCache", "Load", "SlotSnapshot", "SlotTable"]
