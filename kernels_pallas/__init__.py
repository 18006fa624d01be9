"""Pallas kernels for ef_jax (expert-slot FFN)."""
