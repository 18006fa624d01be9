"""ExpertFlow routing-path predictor: a small causal transformer that scores every MoE layer's experts per token.

[token strings] → Vocab → ids i32[B, T] ─┐
[previous token's route] → Σ emb(l·E+e) ─┴→ causal self-attention (ALiBi, packed prompts) × depth
                                          → LayerNorm → Dense(L·E) → logits f32[B, T, L, E]

Axes: B windows, T positions per window, L MoE layers, E experts per layer, K routed experts per token, D model
width, H heads, V vocabulary.

Position t sees the token ids of positions ≤ t of its own prompt and (optionally) the routes of tokens < t: in
decoding, token t's id is known once it is sampled and the routes of earlier tokens were computed by the model,
so one forward pass predicts token t's experts at every layer before its first layer runs. Trained with
multi-label binary cross-entropy per layer (`bce_loss`). Several short prompts are packed into one window;
`segment` ids keep attention inside a prompt, and ALiBi distance biases make the scores independent of where in
a window a prompt starts.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import zlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD, UNK = 0, 1  # reserved vocabulary ids
NGRAMS = 8       # G: hashed character trigrams per token (the first G; 0 = none)


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Shape of a routing-path predictor (the routing it predicts is L layers × E experts, top-K)."""
    vocab_size: int
    num_layers: int          # L: MoE layers of the target model
    num_experts: int         # E: routed experts per layer
    top_k: int               # K: experts routed per token (evaluation and prefetch budget default)
    d_model: int = 128
    num_heads: int = 4
    depth: int = 2
    d_ff: int = 512
    window: int = 128        # T: positions per training window (and the context kept when decoding)
    prev_route: bool = True  # feed the previous token's route as an input
    ngram_buckets: int = 0   # > 0: add hashed character-trigram embeddings (unknown and rare tokens get a vector)
    token_rank: int = 0      # > 0: a per-token route table of rank R added to the logits (the lookup baseline's
                             # memory, learned jointly; the transformer then only models the context's correction)
    dropout: float = 0.1

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
        for name in ("vocab_size", "num_layers", "num_experts", "top_k", "depth", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.vocab_size <= UNK:
            raise ValueError(f"vocab_size={self.vocab_size} must exceed the reserved ids (PAD=0, UNK=1)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PredictorConfig":
        return cls(**d)


class Vocab:
    """Token strings → ids; PAD=0, UNK=1, then strings seen ≥ min_count times in the training trace."""

    def __init__(self, strings: Sequence[str]):
        self.strings = list(strings)  # id → string for ids ≥ 2
        self.index = {s: i + 2 for i, s in enumerate(self.strings)}

    @classmethod
    def build(cls, tokens: Sequence[str], min_count: int = 2) -> "Vocab":
        counts = collections.Counter(tokens)
        # most frequent first, ties by first appearance (Counter keeps insertion order): deterministic
        return cls([s for s, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= min_count])

    def __len__(self) -> int:
        return len(self.strings) + 2

    def encode(self, tokens: Sequence[str], ngram_buckets: int = 0) -> np.ndarray:
        """i32[N] vocabulary ids; with ngram_buckets > 0, i32[N, 1 + G]: the id, then G trigram hashes."""
        ids = np.array([self.index.get(t, UNK) for t in tokens], np.int32)
        if not ngram_buckets:
            return ids
        return np.concatenate([ids[:, None], np.array([trigrams(t, ngram_buckets) for t in tokens], np.int32)
                               .reshape(len(ids), NGRAMS)], axis=1)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.strings, f, ensure_ascii=False)

    @classmethod
    def load(cls, path) -> "Vocab":
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))


def trigrams(token: str, buckets: int) -> list[int]:
    """The first G character trigrams of "<token>", hashed (crc32: stable across runs) into 1..buckets-1."""
    s = f"<{token}>".encode("utf-8", errors="replace")
    grams = [1 + zlib.crc32(s[i:i + 3]) % (buckets - 1) for i in range(max(len(s) - 2, 1))][:NGRAMS]
    return grams + [0] * (NGRAMS - len(grams))


def alibi_slopes(num_heads: int) -> np.ndarray:
    """f32[H]: geometric slopes 2^(-8h/H), h = 1..H (head h forgets distance at its own rate)."""
    return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


class _Block(nn.Module):
    cfg: PredictorConfig

    @nn.compact
    def __call__(self, x, bias, train: bool):
        cfg = self.cfg
        H, D = cfg.num_heads, cfg.d_model
        h = nn.LayerNorm()(x)
        qkv = nn.DenseGeneral((3, H, D // H))(h)                                   # [B, T, 3, H, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H) + bias           # [B, H, T, T]
        att = jax.nn.softmax(att, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        y = nn.DenseGeneral(D, axis=(-2, -1))(y)
        x = x + nn.Dropout(cfg.dropout, deterministic=not train)(y)
        h = nn.Dense(cfg.d_ff)(nn.LayerNorm()(x))
        h = nn.Dense(D)(nn.gelu(h))
        return x + nn.Dropout(cfg.dropout, deterministic=not train)(h)


class PathPredictor(nn.Module):
    """tokens i32[B, T] (or i32[B, T, 1 + G] with trigram hashes), segment i32[B, T] (0 = padding),
    prev i32[B, T, L, K] (the previous token's experts, -1 = none) → logits f32[B, T, L, E]."""
    cfg: PredictorConfig

    @nn.compact
    def __call__(self, tokens, segment, prev=None, train: bool = False):
        cfg = self.cfg
        B, T = segment.shape
        L, E = cfg.num_layers, cfg.num_experts
        ids = tokens[..., 0] if tokens.ndim == 3 else tokens
        x = nn.Embed(cfg.vocab_size, cfg.d_model, name="tok")(ids)                   # [B, T, D]
        if cfg.ngram_buckets:
            grams = tokens[..., 1:]                                                    # [B, T, G], 0 = none
            g = nn.Embed(cfg.ngram_buckets, cfg.d_model, name="ngram")(grams) * (grams > 0)[..., None]
            x = x + g.sum(-2) / np.sqrt(NGRAMS)
        if cfg.prev_route:
            # Σ over the previous token's (layer, expert) pairs of a learned vector: a multi-hot times a matrix
            # (a dense matmul; gathering [B, T, L, K, D] vectors is far slower to differentiate on a CPU)
            hot = multi_hot(prev, E)                                                  # [B, T, L·E]
            w = self.param("route", nn.initializers.normal(1.0 / np.sqrt(L * prev.shape[-1])), (L * E, cfg.d_model))
            x = x + hot @ w
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        pos = jnp.arange(T)
        allowed = (pos[:, None] >= pos[None, :])[None] & (segment[:, :, None] == segment[:, None, :])
        dist = (pos[:, None] - pos[None, :]).astype(jnp.float32)                       # [T, T]
        bias = -jnp.asarray(alibi_slopes(cfg.num_heads), jnp.float32)[:, None, None] * dist  # [H, T, T]
        bias = jnp.where(allowed[:, None], bias[None], -1e9)                          # [B, H, T, T]
        for i in range(cfg.depth):
            x = _Block(cfg, name=f"block{i}")(x, bias, train)
        # start at the base rate K/E: otherwise the first hundred steps only learn that most experts are off
        prior = float(np.log(cfg.top_k / max(E - cfg.top_k, 1)))
        logits = nn.Dense(L * E, name="head", bias_init=nn.initializers.constant(prior))(nn.LayerNorm()(x))
        if cfg.token_rank:
            t = nn.Embed(cfg.vocab_size, cfg.token_rank, name="tok_table")(ids)          # [B, T, R]
            logits = logits + nn.Dense(L * E, use_bias=False, kernel_init=nn.initializers.zeros,
                                       name="tok_table_out")(t)
        return logits.reshape(B, T, L, E)


def multi_hot(experts, num_experts: int):
    """i32[..., L, K] expert ids (-1 = none) → f32[..., L·E] with 1 at every (layer, expert) listed."""
    *lead, L, K = experts.shape
    n = int(np.prod(lead)) if lead else 1
    flat = experts.reshape(n, L * K)
    col = jnp.where(flat >= 0, flat + jnp.repeat(jnp.arange(L) * num_experts, K)[None], L * num_experts)
    hot = jnp.zeros((n, L * num_experts + 1), jnp.float32).at[jnp.arange(n)[:, None], col].set(1.0)
    return hot[:, :-1].reshape(*lead, L * num_experts)


def bce_loss(logits, experts, mask):
    """Mean multi-label BCE per (position, layer, expert) over real positions.
    logits f32[B, T, L, E], experts i32[B, T, L, K] (the true route), mask bool[B, T]."""
    E = logits.shape[-1]
    target = multi_hot(experts, E).reshape(logits.shape)                               # [B, T, L, E]
    per = -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))
    per = per.mean((-2, -1))                                                           # [B, T]
    return (per * mask).sum() / jnp.maximum(mask.sum(), 1)


# ---- packing prompts into windows --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Packed:
    """Prompts cut into pieces of ≤ T tokens, packed first-fit into windows; `where` maps tokens back."""
    tokens: np.ndarray   # i32[M, T] (or [M, T, 1 + G]) vocabulary ids, PAD in unused positions
    segment: np.ndarray  # i32[M, T] 1, 2, ... per piece inside a window; 0 = unused
    prev: np.ndarray     # i32[M, T, L, K] the previous token's experts (same prompt), -1 at a prompt's start
    target: np.ndarray   # i32[M, T, L, K] the token's own experts (0 where unused; masked by segment)
    where: np.ndarray    # i64[N, 2] (window, position) of every trace token, in trace order


def pack(ids: np.ndarray, experts: np.ndarray, offsets: np.ndarray, window: int) -> Packed:
    """ids i32[N] (or [N, 1 + G]), experts i[N, L, K], offsets i64[P+1] → Packed windows of `window` positions.

    A prompt longer than the window is cut into pieces that start with no context (a piece keeps the previous
    token's route, which decoding would have)."""
    N, L, K = experts.shape
    pieces = [(s, min(s + window, int(offsets[p + 1]))) for p in range(len(offsets) - 1)
              for s in range(int(offsets[p]), int(offsets[p + 1]), window)]
    pieces.sort(key=lambda ab: ab[0] - ab[1])  # longest first → fewer windows (stable: deterministic)
    fill: list[int] = []           # used positions per window
    place: list[tuple[int, int]] = []
    for a, b in pieces:
        n = b - a
        w = next((i for i, used in enumerate(fill) if used + n <= window), len(fill))
        if w == len(fill):
            fill.append(0)
        place.append((w, fill[w]))
        fill[w] += n
    M = len(fill)
    tokens = np.full((M, window) + ids.shape[1:], PAD, np.int32)
    segment = np.zeros((M, window), np.int32)
    prev = np.full((M, window, L, K), -1, np.int32)
    target = np.zeros((M, window, L, K), np.int32)
    where = np.zeros((N, 2), np.int64)
    starts = set(int(o) for o in offsets[:-1])
    nseg = np.zeros(M, np.int32)
    for (a, b), (w, pos) in zip(pieces, place):
        nseg[w] += 1
        sl = slice(pos, pos + b - a)
        tokens[w, sl], segment[w, sl], target[w, sl] = ids[a:b], nseg[w], experts[a:b]
        prev[w, pos + 1:pos + b - a] = experts[a:b - 1]
        if a not in starts:
            prev[w, pos] = experts[a - 1]
        where[a:b, 0], where[a:b, 1] = w, np.arange(pos, pos + b - a)
    return Packed(tokens, segment, prev, target, where)


def make_apply(cfg: PredictorConfig):
    """A jitted (params, tokens, segment, prev) → logits f32[B, T, L, E] in inference mode."""
    model = PathPredictor(cfg)

    @jax.jit
    def apply(params, tokens, segment, prev):
        return model.apply({"params": params}, tokens, segment, prev, train=False)
    return apply


def score_packed(cfg: PredictorConfig, params, packed: Packed, batch: int = 32) -> np.ndarray:
    """f32[N, L, E] logits for every trace token of `packed`, in trace order."""
    apply = make_apply(cfg)
    M = packed.tokens.shape[0]
    out = []
    for s in range(0, M, batch):
        sl = slice(s, min(s + batch, M))
        n = sl.stop - sl.start
        pad = batch - n  # fixed batch shape: one compilation
        args = [np.concatenate([a[sl], np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a[sl]
                for a in (packed.tokens, packed.segment, packed.prev)]
        out.append(np.asarray(apply(params, *args))[:n])
    logits = np.concatenate(out)                                                       # [M, T, L, E]
    return logits[packed.where[:, 0], packed.where[:, 1]]


def check_cache_shape(cfg: PredictorConfig, num_layers: int, num_experts: int) -> None:
    """A step predictor serves only the cache shape it was trained for."""
    if (num_layers, num_experts) != (cfg.num_layers, cfg.num_experts):
        raise ValueError(f"the predictor was trained for {cfg.num_layers} layers × {cfg.num_experts} experts; "
                         f"this cache has {num_layers} × {num_experts}")
