"""Shared pytest setup: GPU marker handling."""
import jax
import pytest


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
