"""Quantize the routed experts of an already-built Model (a random-weight benchmark model, a model loaded in float).

[Model with float host experts] → quantize_experts per MoE layer → a new Model sharing params and tokenizer
"""
from __future__ import annotations

import dataclasses

from ef_jax.host_experts import ArrayRows
from ef_jax.quant.pool import quantize_experts
from ef_jax.quant.codes import QuantSpec, spec_for


def with_quantized_experts(model, expert_dtype="int4", group_size: int | None = None):
    """A copy of `model` whose host experts are quantized (resident pools and the store are rebuilt from them).
    expert_dtype: "int8" | "int4" | a QuantSpec."""
    spec = spec_for(expert_dtype, group_size, model.dtype)
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"expert_dtype={expert_dtype!r}: pass 'int8', 'int4' or a QuantSpec")
    if model.expert_quant is not None or model.experts.layout.quant is not None:
        raise ValueError("this model's experts are already quantized: load the float checkpoint to requantize")
    rows = model.experts
    experts = [quantize_experts(rows.layer(j), spec) for j in range(rows.num_layers)]
    return dataclasses.replace(model, experts=ArrayRows(experts), expert_quant=spec)
