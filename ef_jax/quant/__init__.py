"""Quantized routed experts: group-wise int8/int4 codes with float16 scales (+ offsets), their pool, the converted
store and its command.

  QuantSpec(bits, group_size, method, symmetric)   how to quantize (ef_jax.load(expert_dtype=, group_size=))
  quantize / dequantize_reference                  numpy, host side
  QuantExpertPool, dequantize                      the device pool and the dequantization fused into the expert FFN
  with_quantized_experts(model, "int4")            quantize an already-built Model (e.g. a random-weight benchmark)
"""
from ef_jax.lazy import lazy_exports

_EXPORTS = {
    "with_quantized_experts": "ef_jax.quant.apply",
    **{n: "ef_jax.quant.pool" for n in ("QuantExpertPool", "dequantize", "quantize_experts")},
    **{n: "ef_jax.quant.formats" for n in ("BITS", "DEFAULT_GROUP_SIZE", "METHODS")},
    **{n: "ef_jax.quant.codes" for n in ("QTensor", "QuantSpec", "dequantize_reference", "pack_int4", "quantize",
                                           "unpack_int4")},
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)  # the command line reads the formats without jax
