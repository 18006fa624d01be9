"""Pallas kernels for ef_jax: the expert-slot SwiGLU FFN (decode and prefill regimes), float and quantized pools."""
from kernels_pallas.expert_ffn import (BlockSizes, expert_ffn, expert_ffn_ragged_dot, expert_ffn_reference,
                                       pad_ffn, tuned_block_sizes)
from kernels_pallas.quant_expert_ffn import (quant_expert_ffn, quant_expert_ffn_reference,
                                             quant_pool_expert_ffn)

__all__ = ["BlockSizes", "expert_ffn", "expert_ffn_ragged_dot", "expert_ffn_reference", "pad_ffn",
           "quant_expert_ffn", "quant_expert_ffn_reference", "quant_pool_expert_ffn", "tuned_block_sizes"]
