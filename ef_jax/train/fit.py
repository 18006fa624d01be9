"""Step 2: train the default model on prepared streams and export it as a Hugging Face checkpoint.

Deterministic for a given (TrainConfig, data directory, backend): the batch of step s is a pure function of
(seed, s). Prints progress (loss, load balance, tokens/s, held-out loss per domain) and stops at `steps` or
`max_minutes`, whichever comes first; the exported model and training_log.json say which.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.train.config import TrainConfig
from ef_jax.train.corpus import DOMAINS
from ef_jax.train.data import eval_windows, sample_batch
from ef_jax.train.export import export_checkpoint
from ef_jax.train.objective import hf_config_dict, init_params, loss_fn, model_config


def make_optimizer(tc: TrainConfig):
    import optax
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
                                                  end_value=tc.lr * tc.min_lr_frac)
    # No weight decay on norm scales (1-D) — decaying them towards 0 only fights the normalisation.
    decay_mask = lambda tree: jax.tree.map(lambda a: a.ndim > 1, tree)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask))


def _make_step(cfg, tc: TrainConfig, opt):
    import optax

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch, key):
        trainable, opt_state = state
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, cfg, tc, batch, key)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), dict(m, loss=loss)
    return step


def _calibrate_steps(tc: TrainConfig, cfg, train, timed: int = 20) -> int:
    """Times `timed` steps after compilation and returns how many steps fit in ~90 % of max_minutes (the rest
    covers compilation, evaluation and export)."""
    opt = make_optimizer(tc.replace(steps=10**6))
    params, experts = init_params(cfg, tc.seed)
    state = ((params, experts), opt.init((params, experts)))
    step = _make_step(cfg, tc, opt)
    batches = [jnp.asarray(sample_batch(train, tc.batch_size, tc.seq_len, tc.seed + 1, s)) for s in range(timed)]
    key = jax.random.PRNGKey(tc.seed)
    state, m = step(state, batches[0], key)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for b in batches:
        state, m = step(state, b, key)
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - t) / timed
    steps = min(max(int(tc.max_minutes * 60 * 0.9 / (per_step * 1.05)), 10), tc.max_auto_steps)
    print(f"[fit] calibrated: {per_step * 1e3:.1f} ms/step → {steps} steps in {tc.max_minutes:.1f} min", flush=True)
    return steps


def fit(tc: TrainConfig, data_dir: str, out_dir: str, *, export_dtype: str = "bfloat16") -> dict:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    streams = dict(np.load(os.path.join(data_dir, "streams.npz")))
    train = [streams[f"{d}_train"] for d in DOMAINS]
    heldout = {d: jnp.asarray(eval_windows(streams[f"{d}_heldout"], tc.seq_len, 16)) for d in DOMAINS}
    cfg = model_config(tc, tok.eos_token_id)
    t0 = time.perf_counter()
    if tc.steps <= 0:  # "auto": as many steps as fit in max_minutes, so the LR schedule runs to its end
        tc = tc.replace(steps=_calibrate_steps(tc, cfg, train))
    opt = make_optimizer(tc)
    params, experts = init_params(cfg, tc.seed)
    state = ((params, experts), opt.init((params, experts)))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves((params, experts)))
    print(f"[fit] {cfg.describe()}; {n_params / 1e6:.2f}M parameters; backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}); batch {tc.batch_size}×{tc.seq_len}; {tc.steps} steps", flush=True)
    step = _make_step(cfg, tc, opt)
    base_key = jax.random.PRNGKey(tc.seed)

    @jax.jit
    def eval_loss(trainable, windows):
        return loss_fn(trainable, cfg, tc, windows)[1]["ce"]

    # Early stopping on held-out loss: the corpus is small next to what a GPU can stream through the model, so
    # the exported weights are those of the best evaluation, not necessarily the last step.
    log, done, tokens, best = [], 0, 0, (float("inf"), 0, None)
    t_last, tok_last = time.perf_counter(), 0
    for s in range(tc.steps):
        batch = jnp.asarray(sample_batch(train, tc.batch_size, tc.seq_len, tc.seed, s))
        state, m = step(state, batch, jax.random.fold_in(base_key, s))
        tokens += tc.batch_size * tc.seq_len
        done = s + 1
        last = done == tc.steps or (time.perf_counter() - t0) / 60 >= tc.max_minutes
        if done % tc.eval_every == 0 or last or done == 1:
            m = {k: float(v) for k, v in m.items()}
            now = time.perf_counter()
            ev = {d: float(eval_loss(state[0], w)) for d, w in heldout.items()}
            rate = (tokens - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens
            mean_ev = float(np.mean(list(ev.values())))
            if mean_ev < best[0]:
                best = (mean_ev, done, jax.device_get(state[0]))
            print(f"[fit] step {done}/{tc.steps}  loss {m['loss']:.3f}  ce {m['ce']:.3f}  balance {m['balance']:.3f}  "
                  f"z {m['z']:.2f}  held-out ce " + " ".join(f"{d} {v:.3f}" for d, v in ev.items())
                  + f"  {rate / 1e3:.1f}k tok/s  {(now - t0) / 60:.1f} min", flush=True)
            log.append(dict(step=done, minutes=(now - t0) / 60, heldout_ce=ev, tokens_per_s=rate, **m))
        if last:
            break
    minutes = (time.perf_counter() - t0) / 60
    params, experts = best[2]
    summary = {"steps_done": done, "exported_step": best[1], "exported_heldout_ce": best[0],
               "steps_planned": tc.steps, "tokens_seen": tokens, "minutes": minutes,
               "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "parameters": n_params, "stopped_by": "steps" if done == tc.steps else "max_minutes", "log": log}
    corpus = json.load(open(os.path.join(data_dir, "corpus.json")))
    export_checkpoint(out_dir, cfg, hf_config_dict(tc, tok.eos_token_id), params, experts, tok, dtype=export_dtype,
                      extra_files={"training_config.json": tc.to_json(),
                                   "training_log.json": json.dumps(summary, indent=2),
                                   "corpus.json": json.dumps(corpus, indent=2)})
    print(f"[fit] {done} steps, {tokens / 1e6:.1f}M tokens in {minutes:.1f} min; exported to {out_dir}", flush=True)
    return summary
