"""The quantized-expert formats' names and defaults, without jax: the command line builds its flags from these
before anything heavy is imported (a refused command answers at once)."""
from __future__ import annotations

BITS = {"int8": 8, "int4": 4}  # expert dtype name → bits per code
METHODS = ("rtn", "hqq")       # how codes are fitted (ef_jax.quant.codes)
DEFAULT_GROUP_SIZE = 64        # rows per quantization group along an expert matrix's input axis
