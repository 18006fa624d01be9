"""One-shot APIs over the decode loop's full mode: logits(), trace_routing(), save_routing_trace().

[token ids] → Forward (resident) → decode.full → logits f32[B, T, V] | routed experts i32[N, L_moe, K]
"""
from __future__ import annotations

import numpy as np

from ef_jax.engine.loop.batch import normalize_prompts
from ef_jax.engine.loop.decode import full
from ef_jax.engine.forward.forward import Forward
from ef_jax.model import Model
from ef_jax.progress import bar
from ef_jax.trace import save_trace


def _as_token_array(model: Model, token_ids) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be a non-empty integer array [B, T]; got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    V = model.config.vocab_size
    if arr.min() < 0 or arr.max() >= V:
        raise ValueError(f"token_ids must lie in [0, {V}); got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


def logits(model: Model, token_ids, *, layers_per_group: int | None = None, offload=None) -> np.ndarray:
    """Full forward pass. token_ids int [B, T] → float32 logits [B, T, V] (host numpy)."""
    tokens = _as_token_array(model, token_ids)
    with Forward(model, offload, layers_per_group=layers_per_group, kv_shape=tokens.shape) as fwd:
        out, _ = full(fwd, tokens)
        return np.asarray(out)


def trace_routing(model: Model, texts_or_token_ids, *, layers_per_group: int | None = None,
                  max_tokens_per_sequence: int = 1024, offload=None) -> np.ndarray:
    """Routed experts of every token: int [N, L_moe, K], tokens in order (sequences concatenated), one column
    per MoE layer. A str or list of str is tokenized (needs a tokenizer); lists of ids are used as they are.
    Sequences longer than max_tokens_per_sequence are split into independent chunks."""
    ids, _ = normalize_prompts(texts_or_token_ids, model.tokenizer, model.config.vocab_size)
    if not model.config.moe_layer_ids:
        raise ValueError("this model has no MoE layers: there is no routing to trace")
    rows = []
    kv_shape = (1, min(max_tokens_per_sequence, max(map(len, ids))))  # one chunk at a time
    with Forward(model, offload, layers_per_group=layers_per_group, kv_shape=kv_shape) as fwd:
        for seq in bar(ids, desc="tracing", unit="seq"):
            for start in range(0, len(seq), max_tokens_per_sequence):
                chunk = np.asarray([seq[start:start + max_tokens_per_sequence]], np.int32)
                rows.append(full(fwd, chunk, all_logits=False)[1])
    return np.concatenate(rows, axis=0)


def save_routing_trace(model: Model, chunks, path: str) -> np.ndarray:
    """Traces each token-id chunk as its own sequence (one prompt per chunk) and writes the routing-trace .npz
    (experts, offsets, prompt_id, token strings) that ef_jax.trace.load_trace reads. Returns experts [N, L, K]."""
    chunks = [list(c) for c in chunks]
    experts = trace_routing(model, chunks)
    tokens = [t for c in chunks for t in (model.tokenizer.convert_ids_to_tokens(c) if model.tokenizer
                                          else [str(i) for i in c])]
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    save_trace(path, experts, offsets, np.arange(len(chunks), dtype=np.int32), tokens)
    return experts
