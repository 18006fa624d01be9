"""The default model's architecture, initialisation and training loss — built from ef_jax's own model functions.

[tokens i32[B, T+1]] → inputs [:, :-1] → embed → per layer: layer_attention_and_route (ef_jax.models) → MoE with
every expert evaluated densely and combined with the router's sparse top-k weights (equal to ef_jax's sparse
kernels, differentiable, and cheap at this size) → head → cross-entropy on targets [:, 1:]
+ aux_loss_coef · load-balancing loss + z_loss_coef · router z-loss (both averaged over MoE layers).

Axes: B batch, T sequence, N = B·T tokens, D model, E experts, K top-k, F expert width, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.checkpoint import expected_shapes, expert_shapes, set_dotted
from ef_jax.config import ModelConfig, from_hf_config
from ef_jax.models import attention as attn_lib
from ef_jax.models.moe import Routing
from ef_jax.models.transformer import (
    head,
    layer_attention_and_route,
    layer_kinds,
    make_context,
)
from ef_jax.train.config import TrainConfig


def hf_config_dict(tc: TrainConfig, eos_id: int) -> dict:
    """The transformers Qwen3-MoE config of the default model (what config.json holds)."""
    from transformers import Qwen3MoeConfig
    hf = Qwen3MoeConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=4 * tc.hidden_size,
        num_hidden_layers=tc.num_layers, num_attention_heads=tc.num_heads, num_key_value_heads=tc.num_kv_heads,
        head_dim=tc.head_dim, hidden_act="silu", max_position_embeddings=tc.max_position, rms_norm_eps=1e-6,
        rope_theta=tc.rope_theta, tie_word_embeddings=False, attention_bias=False, decoder_sparse_step=1,
        moe_intermediate_size=tc.moe_intermediate, num_experts_per_tok=tc.top_k, num_experts=tc.num_experts,
        norm_topk_prob=True, router_aux_loss_coef=tc.aux_loss_coef, mlp_only_layers=[],
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    d = hf.to_dict()
    d["architectures"] = ["Qwen3MoeForCausalLM"]
    if "rope_theta" not in d and "rope_parameters" not in d:  # older/newer transformers spell it differently
        d["rope_theta"] = tc.rope_theta
    return d


def model_config(tc: TrainConfig, eos_id: int) -> ModelConfig:
    """Parsed back through ef_jax's own loader path, so training and inference cannot disagree."""
    return from_hf_config(hf_config_dict(tc, eos_id))


def init_params(cfg: ModelConfig, seed: int) -> tuple[dict, tuple]:
    """Normal(0, 0.02) weights; output projections (attn o, expert down) scaled by 1/sqrt(2L); norms 1.
    Returns (params in ef_jax's layout, experts: per layer {gate [E,D,F], up [E,D,F], down [E,F,D]})."""
    rng = np.random.default_rng(seed)
    resid_scale = 1.0 / np.sqrt(2 * cfg.num_layers)

    def draw(shape, name):
        if name.endswith("norm"):
            return np.ones(shape, np.float32)
        w = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return w * resid_scale if name.endswith((".o", "down")) else w

    params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
    for name, shape in expected_shapes(cfg).items():
        set_dotted(params, name, draw(shape, name))
    experts = tuple({k: draw(s, k) for k, s in expert_shapes(cfg).items()} for _ in range(cfg.num_layers))
    return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, experts)


def dense_moe(x: jax.Array, routing: Routing, ex: dict) -> jax.Array:
    """x [N, D] → Σ_k w[n,k] · FFN_{e[n,k]}(x[n]) [N, D], computing every expert and masking by the combine
    weights (zero for unchosen experts)."""
    N, E = routing.logits.shape
    combine = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], routing.experts].set(routing.weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, ex["gate"])) * jnp.einsum("nd,edf->nef", x, ex["up"])
    return jnp.einsum("nef,efd,ne->nd", h, ex["down"], combine.astype(x.dtype))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def forward(cfg: ModelConfig, params: dict, experts: tuple, tokens: jax.Array, *, dropout: float = 0.0,
            key: jax.Array | None = None):
    """tokens i32[B, T] → (logits f32[B, T, V], routings per layer). With a key, dropout on the embedding and on
    each MoE output (training only; key=None is the exact inference function)."""
    B, T = tokens.shape
    keys = list(jax.random.split(key, cfg.num_layers + 1)) if key is not None else [None] * (cfg.num_layers + 1)
    x = _dropout(params["embed"][tokens], dropout, keys[-1])
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = make_context(cfg, positions, jnp.int32(0), jnp.ones((B, T), bool))
    routings = []
    for p, kind, ex, k in zip(params["layers"], layer_kinds(cfg), experts, keys):
        cache = attn_lib.init_layer_cache(cfg, B, T, x.dtype)  # T slots, written at 0: plain causal attention
        h, normed, routing, _ = layer_attention_and_route(p, cfg, kind, x, cache, ctx)
        x = h + _dropout(dense_moe(normed, routing, ex), dropout, k).reshape(h.shape)
        routings.append(routing)
    return head(cfg, params, x, last_only=False), routings


def balance_losses(routing: Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, z-loss) of one layer. Balance: E · Σ_e frac_e · mean_prob_e (1 when uniform)."""
    probs = jax.nn.softmax(routing.logits, axis=-1)                                     # [N, E]
    counts = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32).sum((0, 1))  # [E]
    frac = counts / counts.sum()
    balance = num_experts * jnp.sum(frac * probs.mean(0))
    z = jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2)
    return balance, z


def loss_fn(trainable: tuple, cfg: ModelConfig, tc: TrainConfig, batch: jax.Array, key: jax.Array | None = None):
    """trainable = (params, experts); batch i32[B, T+1]; key: dropout randomness (None = evaluation).
    Returns (loss, metrics dict)."""
    params, experts = trainable
    logits, routings = forward(cfg, params, experts, batch[:, :-1], dropout=tc.dropout, key=key)
    targets = batch[:, 1:]
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1))
    balance, z = (jnp.mean(jnp.stack(v)) for v in zip(*(balance_losses(r, cfg.num_experts) for r in routings)))
    loss = ce + tc.aux_loss_coef * balance + tc.z_loss_coef * z
    return loss, {"ce": ce, "balance": balance, "z": z}
