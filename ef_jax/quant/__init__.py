"""Quantized routed experts: group-wise int8/int4 codes with float16 scales (+ offsets), their pool, the converted
store and its command.

  QuantSpec(bits, group_size, method, symmetric)   how to quantize (ef_jax.load(expert_dtype=, group_size=))
  quantize / dequantize_reference                  numpy, host side
  QuantExpertPool, dequantize                      the device pool and the dequantization fused into the expert FFN
  with_quantized_experts(model, "int4")            quantize an already-built Model (e.g. a random-weight benchmark)
"""
from ef_jax.quant.apply import with_quantized_experts
from ef_jax.quant.pool import QuantExpertPool, dequantize, quantize_experts
from ef_jax.quant.quantize import (BITS, DEFAULT_GROUP_SIZE, METHODS, QTensor, QuantSpec, dequantize_reference,
                                   pack_int4, quantize, unpack_int4)

__all__ = ["BITS", "DEFAULT_GROUP_SIZE", "METHODS", "QTensor", "QuantExpertPool", "QuantSpec", "dequantize",
           "dequantize_reference", "pack_int4", "quantize", "quantize_experts", "unpack_int4",
           "with_quantized_experts"]
