"""Frozen dataclasses that are jax pytrees: what flax.struct.dataclass gives, without importing flax.

@pytree.dataclass → dataclasses.dataclass(frozen=True) → jax.tree_util.register_dataclass(data | meta fields)
                  + .replace(**changes)

The decode path's device state (KVCache, ExpertPool, Routing, QuantExpertPool, ...) is made of these. Importing
flax costs ~0.17 s of CPU (flax.linen, flax.core, their dependencies) on every `ef-jax generate`, whose warm
first token is ~2 s on the 2-core CPU (issue 28); nothing on that path needs more of flax than this.
"""
from __future__ import annotations

import dataclasses

import jax


def field(*, pytree_node: bool = True, **kwargs):
    """A dataclass field; pytree_node=False makes it static (part of the treedef, hashed by jit), as in flax."""
    return dataclasses.field(metadata={**kwargs.pop("metadata", {}), "pytree_node": pytree_node}, **kwargs)


def dataclass(cls):
    """A frozen dataclass registered as a pytree: fields are leaves unless declared field(pytree_node=False)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if f.metadata.get("pytree_node", True)]
    meta = [f.name for f in fields if not f.metadata.get("pytree_node", True)]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    return cls
