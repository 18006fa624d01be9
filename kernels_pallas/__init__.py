"""Pallas kernels for ef_jax: the expert-slot SwiGLU FFN (decode and prefill regimes)."""
from kernels_pallas.expert_ffn import (BlockSizes, expert_ffn, expert_ffn_ragged_dot, expert_ffn_reference,
                                       pad_ffn)

__all__ = ["BlockSizes", "expert_ffn", "expert_ffn_ragged_dot", "expert_ffn_reference", "pad_ffn"]
