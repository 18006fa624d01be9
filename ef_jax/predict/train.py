"""Train the routing-path predictor on recorded routing traces; save it with orbax plus a JSON config.

[TRACE.npz ...] → first `train_prompts` prompts of each → Vocab → pack into windows → AdamW (BCE per layer)
→ until max_steps or max_minutes → DIR/{config.json, vocab.json, params/}

Axes: N tokens, L MoE layers, E experts, K routed experts per token, M windows, T positions per window.

The learning rate warms up, then follows a cosine to zero over whichever limit comes first (steps or wall time),
so a time-limited run still ends with a decayed rate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ef_jax.predict.baselines import recall_at_k
from ef_jax.predict.path_predictor import (NGRAMS, PathPredictor, PredictorConfig, Vocab, bce_loss, pack,
                                           score_packed)
from ef_jax.progress import bar
from ef_jax.trace import RoutingTrace, make_trace


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the model's shape is a PredictorConfig)."""
    batch: int = 32                # windows per step
    max_steps: int = 3000
    max_minutes: float = 15.0
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    min_count: int = 2             # a token string seen fewer times in training maps to UNK
    seed: int = 0
    eval_every: int = 200          # steps between validation prints (0: only at the end)

    def __post_init__(self):
        if self.batch < 1 or self.max_steps < 1 or not self.max_minutes > 0:
            raise ValueError(f"batch={self.batch}, max_steps={self.max_steps} and max_minutes={self.max_minutes} "
                             f"must be positive")


def trace_digest(trace: RoutingTrace) -> str:
    """Short content hash: identifies a trace across paths (used to keep evaluation off the training prompts)."""
    h = hashlib.sha1(trace.experts.tobytes())
    h.update(trace.offsets.tobytes())
    return h.hexdigest()[:16]


def prompt_slice(trace: RoutingTrace, start: int, stop: int) -> RoutingTrace:
    """The sub-trace of prompts [start, stop)."""
    if not 0 <= start <= stop <= trace.num_prompts:
        raise ValueError(f"prompt range {start}:{stop} is outside the trace's {trace.num_prompts} prompts")
    a, b = int(trace.offsets[start]), int(trace.offsets[stop])
    names = trace.tokens.split(b"\0")[:-1]
    return make_trace(trace.experts[a:b], trace.offsets[start:stop + 1] - a, trace.prompt_id[start:stop],
                      b"".join(t + b"\0" for t in names[a:b]))


def default_train_prompts(num_prompts: int) -> int:
    """The first 80% of the prompts (rounded up) train; the rest validate."""
    return min(num_prompts, math.ceil(0.8 * num_prompts))


def concat_traces(traces: Sequence[RoutingTrace]) -> RoutingTrace:
    if len({t.experts.shape[1:] for t in traces}) != 1:
        raise ValueError(f"traces disagree on [L, K]: {[list(t.experts.shape[1:]) for t in traces]}; train one "
                         f"predictor per model")
    offs, n = [np.zeros(1, np.int64)], 0
    for t in traces:
        offs.append(t.offsets[1:] + n)
        n += t.num_tokens
    return make_trace(np.concatenate([t.experts for t in traces]), np.concatenate(offs),
                      np.concatenate([t.prompt_id for t in traces]), b"".join(t.tokens for t in traces))


def _lr_factor(step: int, frac_done: float, warmup: int) -> float:
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(frac_done, 1.0)))


def _make_step(model: PathPredictor, tx):
    @jax.jit
    def step(params, opt_state, key, tokens, segment, prev, target):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens, segment, prev, train=True, rngs={"dropout": key})
            return bce_loss(logits, target, segment > 0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def fit(train: RoutingTrace, cfg: PredictorConfig, tc: TrainConfig, vocab: Vocab, *,
        val: RoutingTrace | None = None, log: Callable[[str], None] = print):
    """Train from scratch; returns (params, history list of dicts)."""
    data = pack(vocab.encode(train.token_strings(), cfg.ngram_buckets), train.experts, train.offsets, cfg.window)
    M = data.tokens.shape[0]
    val_packed = (pack(vocab.encode(val.token_strings(), cfg.ngram_buckets), val.experts, val.offsets, cfg.window)
                  if val else None)
    model = PathPredictor(cfg)
    key = jax.random.key(tc.seed)
    key, init_key = jax.random.split(key)
    B = min(tc.batch, M)
    # jitted: one compiled program instead of ~130 op-by-op ones (seconds on a CPU, for a function run once)
    params = jax.jit(model.init)(init_key, data.tokens[:B], data.segment[:B], data.prev[:B])["params"]
    log(f"predictor: {sum(x.size for x in jax.tree.leaves(params)):,} parameters, vocab {len(vocab)}, "
        f"{train.num_tokens} training tokens in {M} windows of {cfg.window}")
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=tc.lr, weight_decay=tc.weight_decay)
    opt_state = tx.init(params)
    step_fn = _make_step(model, tx)
    rng = np.random.default_rng(tc.seed)
    order, cursor = rng.permutation(M), 0
    t0, history, budget_s = time.perf_counter(), [], tc.max_minutes * 60
    for step in bar(range(tc.max_steps), desc="training predictor", unit="step"):
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            log(f"step {step}: time limit ({tc.max_minutes} min) reached")
            break
        if cursor + B > M:
            order, cursor = rng.permutation(M), 0
        idx = np.sort(order[cursor:cursor + B])
        cursor += B
        opt_state.hyperparams["learning_rate"] = jnp.asarray(
            tc.lr * _lr_factor(step, max(step / tc.max_steps, elapsed / budget_s), tc.warmup))
        key, sub = jax.random.split(key)
        params, opt_state, loss = step_fn(params, opt_state, sub, data.tokens[idx], data.segment[idx],
                                          data.prev[idx], data.target[idx])
        last = step + 1 == tc.max_steps
        if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last or step == 0:
            rec = {"step": step + 1, "loss": float(loss), "minutes": (time.perf_counter() - t0) / 60}
            if val_packed is not None and (step > 0 or last):
                rec["val_recall"] = float(recall_at_k(score_packed(cfg, params, val_packed), val.experts).mean())
            history.append(rec)
            log("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    if val_packed is not None and (not history or "val_recall" not in history[-1] or history[-1]["step"] != step + 1):
        rec = {"step": step + 1, "minutes": (time.perf_counter() - t0) / 60,
               "val_recall": float(recall_at_k(score_packed(cfg, params, val_packed), val.experts).mean())}
        history.append(rec)
        log(f"final: step {rec['step']}  val_recall {rec['val_recall']:.4f}  minutes {rec['minutes']:.2f}")
    return params, history


def save_predictor(out: str | os.PathLike, cfg: PredictorConfig, params, vocab: Vocab, meta: dict) -> None:
    """DIR/config.json ({"model": PredictorConfig, ...meta}), DIR/vocab.json, DIR/params (orbax)."""
    import orbax.checkpoint as ocp
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "params")
    if os.path.exists(ckpt):
        raise ValueError(f"{ckpt} already exists: choose a new --out directory or remove it")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt, jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()
    vocab.save(os.path.join(out, "vocab.json"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model": cfg.to_json(), **meta}, f, indent=1)


def load_predictor(directory: str | os.PathLike):
    """(PredictorConfig, params, Vocab, meta) from a directory written by save_predictor."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no config.json: is it an `ef-jax train-predictor --out` dir?")
    with open(path) as f:
        meta = json.load(f)
    cfg = PredictorConfig.from_json(meta.pop("model"))
    vocab = Vocab.load(os.path.join(directory, "vocab.json"))
    model = PathPredictor(cfg)
    T = cfg.window
    tok_shape = (1, T, 1 + NGRAMS) if cfg.ngram_buckets else (1, T)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(tok_shape, np.int32),
                                                 np.ones((1, T), np.int32),
                                                 np.zeros((1, T, cfg.num_layers, cfg.top_k), np.int32))["params"])
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), abstract)
    return cfg, params, vocab, meta


def train_predictor(traces: Sequence[RoutingTrace], paths: Sequence[str], out: str | os.PathLike, *,
                    tc: TrainConfig = TrainConfig(), train_prompts: int | None = None,
                    log: Callable[[str], None] = print, **model_kw) -> dict:
    """Split each trace (first train_prompts prompts train, the rest validate), train, save. Returns meta."""
    trains, vals, splits = [], [], []
    for t, path in zip(traces, paths):
        n = default_train_prompts(t.num_prompts) if train_prompts is None else min(train_prompts, t.num_prompts)
        trains.append(prompt_slice(t, 0, n))
        if n < t.num_prompts:
            vals.append(prompt_slice(t, n, t.num_prompts))
        splits.append({"path": os.path.abspath(path), "digest": trace_digest(t), "train_prompts": n,
                       "num_prompts": t.num_prompts})
    train = concat_traces(trains)
    val = concat_traces(vals) if vals else None
    E = max(int(t.experts.max()) for t in traces) + 1
    E = model_kw.pop("num_experts", E)
    vocab = Vocab.build(train.token_strings(), tc.min_count)
    cfg = PredictorConfig(vocab_size=len(vocab), num_layers=train.experts.shape[1], num_experts=E,
                          top_k=train.experts.shape[2], **model_kw)
    t0 = time.perf_counter()
    params, history = fit(train, cfg, tc, vocab, val=val, log=log)
    meta = {"train": dataclasses.asdict(tc), "traces": splits, "history": history,
            "train_minutes": (time.perf_counter() - t0) / 60, "jax_backend": jax.default_backend()}
    save_predictor(out, cfg, params, vocab, meta)
    log(f"saved predictor to {os.fspath(out)}")
    return meta
