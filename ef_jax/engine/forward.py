"""All-resident forward pass over layer groups, and the one-shot APIs built on it: logits() and trace_routing().

[tokens] → embed → run_group(g) for each layer group → hidden [B, T, D]   (head() is applied by the caller)

A "forward" object is what the decode loop drives: `fwd(tokens, positions, write_idx, valid, cache)` →
(hidden, cache, routings). The offload engine provides the same call with experts streamed into slots.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ef_jax.model import Model
from ef_jax.models.transformer import KVCache, embed, head, init_cache, layer_kinds, run_group

DEFAULT_LAYERS_PER_GROUP = 4


def layer_groups(num_layers: int, layers_per_group: int) -> list[tuple[int, ...]]:
    if not isinstance(layers_per_group, int) or layers_per_group < 1:
        raise ValueError(f"layers_per_group={layers_per_group!r} must be a positive int")
    return [tuple(range(i, min(i + layers_per_group, num_layers))) for i in range(0, num_layers, layers_per_group)]


class ResidentForward:
    """Every expert on the device; one jitted call per layer group."""

    def __init__(self, model: Model, layers_per_group: int = DEFAULT_LAYERS_PER_GROUP):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.groups = layer_groups(cfg.num_layers, layers_per_group)
        self.kinds = layer_kinds(cfg)
        self.pools = model.resident_pools()
        identity = jnp.arange(cfg.num_experts, dtype=jnp.int32)
        self.slot_maps = tuple(identity if cfg.moe_layers[i] else None for i in range(cfg.num_layers))

    def __call__(self, tokens, positions, write_idx, valid, cache: KVCache):
        """tokens, positions i32[B, T]; write_idx: first cache slot to write; valid bool[B, S] (new tokens
        included). Returns (hidden [B, T, D], cache, routings: per layer Routing or None)."""
        params = self.model.params
        x = embed(self.cfg, params["embed"], jnp.asarray(tokens, jnp.int32))
        positions = jnp.asarray(positions, jnp.int32)
        write_idx = jnp.asarray(write_idx, jnp.int32)
        valid = jnp.asarray(valid)
        caches = list(cache.layers)
        routings: list = [None] * self.cfg.num_layers
        for g in self.groups:
            x, new, r = run_group(self.cfg, tuple(self.kinds[i] for i in g), tuple(params["layers"][i] for i in g),
                                  tuple(self.pools[i] for i in g), tuple(self.slot_maps[i] for i in g),
                                  x, tuple(caches[i] for i in g), positions, write_idx, valid)
            for i, c, ri in zip(g, new, r):
                caches[i], routings[i] = c, ri
        return x, KVCache(layers=tuple(caches), valid=valid), routings


def _as_token_array(model: Model, token_ids) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be a non-empty integer array [B, T]; got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    V = model.config.vocab_size
    if arr.min() < 0 or arr.max() >= V:
        raise ValueError(f"token_ids must lie in [0, {V}); got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


def _full_forward(model: Model, tokens: np.ndarray, layers_per_group: int):
    B, T = tokens.shape
    fwd = ResidentForward(model, layers_per_group)
    cache = init_cache(model.config, B, T, model.params["embed"].dtype)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return fwd(tokens, positions, 0, np.ones((B, T), bool), cache)


def logits(model: Model, token_ids, *, layers_per_group: int = DEFAULT_LAYERS_PER_GROUP) -> np.ndarray:
    """Full forward pass. token_ids int [B, T] → float32 logits [B, T, V] (host numpy)."""
    tokens = _as_token_array(model, token_ids)
    x, _, _ = _full_forward(model, tokens, layers_per_group)
    return np.asarray(head(model.config, model.params, x, last_only=False))


def trace_routing(model: Model, texts_or_token_ids, *, layers_per_group: int = DEFAULT_LAYERS_PER_GROUP,
                  max_tokens_per_sequence: int = 1024) -> np.ndarray:
    """Routed experts of every token: int [N, L_moe, K], tokens in order (sequences concatenated), one column
    per MoE layer. A str or list of str is tokenized (needs a tokenizer); lists of ids are used as they are.
    Sequences longer than max_tokens_per_sequence are split into independent chunks."""
    from ef_jax.engine.batch import normalize_prompts
    ids, _ = normalize_prompts(texts_or_token_ids, model.tokenizer, model.config.vocab_size)
    if not model.config.moe_layer_ids:
        raise ValueError("this model has no MoE layers: there is no routing to trace")
    rows = []
    for seq in ids:
        for start in range(0, len(seq), max_tokens_per_sequence):
            chunk = np.asarray([seq[start:start + max_tokens_per_sequence]], np.int32)
            _, _, routings = _full_forward(model, chunk, layers_per_group)
            per_layer = [np.asarray(routings[i].experts) for i in model.config.moe_layer_ids]  # [T, K] each
            rows.append(np.stack(per_layer, axis=1))
    return np.concatenate(rows, axis=0)


def save_routing_trace(model: Model, chunks, path: str) -> np.ndarray:
    """Traces each token-id chunk as its own sequence (one prompt per chunk) and writes the routing-trace .npz
    (experts, offsets, prompt_id, token strings) that ef_jax.sim.trace.load_trace reads. Returns experts [N, L, K]."""
    from ef_jax.sim.trace import save_trace
    chunks = [list(c) for c in chunks]
    experts = np.concatenate([trace_routing(model, [c]) for c in chunks])
    tokens = [t for c in chunks for t in (model.tokenizer.convert_ids_to_tokens(c) if model.tokenizer
                                          else [str(i) for i in c])]
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    save_trace(path, experts, offsets, np.arange(len(chunks), dtype=np.int32), tokens)
    return experts
