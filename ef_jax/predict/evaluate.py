"""Evaluate routing predictors side by side: recall@K per layer and mean, precision/recall at a prefetch budget.

[scores f32[N, L, E] per predictor] × [actual route i[N, L, K]] → recall@K[L], mean; at budget m experts per layer:
precision = |top-m ∩ actual| / m, recall = |top-m ∩ actual| / K

Axes: N tokens, L MoE layers, E experts, K routed experts per token, m prefetch budget per layer.

recall@K = |predicted top-K ∩ actual| / K (precision and recall coincide at m = K). The baselines (frequency,
previous token, per-token lookup) are fitted on the same training prompts the predictor saw.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from ef_jax.predict.baselines import FrequencyBaseline, PreviousTokenBaseline, TokenLookupBaseline, recall_at_k
from ef_jax.trace import RoutingTrace, load_trace

BASELINES = {"frequency": FrequencyBaseline, "previous_token": PreviousTokenBaseline,
             "token_lookup": TokenLookupBaseline}


def budget_metrics(scores: np.ndarray, experts: np.ndarray, budget: int) -> dict:
    """Precision and recall of the top-`budget` experts per layer (mean over tokens and layers)."""
    K = experts.shape[-1]
    hits = recall_at_k(scores, experts, budget) * budget  # mean overlap count per layer, f[L]
    return {"budget": budget, "precision": float(hits.mean() / budget), "recall": float(hits.mean() / K)}


def report(scores: np.ndarray, experts: np.ndarray, budgets: Sequence[int] = ()) -> dict:
    """recall@K per layer and mean, plus precision/recall at each prefetch budget."""
    per_layer = recall_at_k(scores, experts)
    return {"mean_recall": float(per_layer.mean()), "layer_recall": [float(r) for r in per_layer],
            "at_budget": [budget_metrics(scores, experts, m) for m in budgets]}


def eval_split(trace: RoutingTrace, meta: dict) -> tuple[int, int]:
    """The prompts of `trace` to evaluate: the held-out ones when the predictor was trained on this very trace
    (matched by content digest), else all of them."""
    from ef_jax.predict.train import trace_digest
    digest = trace_digest(trace)
    for split in meta.get("traces", []):
        if split.get("digest") == digest:
            return int(split["train_prompts"]), trace.num_prompts
    return 0, trace.num_prompts


def training_trace(meta: dict) -> RoutingTrace | None:
    """The predictor's training prompts (for fitting baselines), when its training trace files are present."""
    from ef_jax.predict.train import concat_traces, prompt_slice
    parts = []
    for split in meta.get("traces", []):
        if not os.path.exists(split["path"]):
            return None
        parts.append(prompt_slice(load_trace(split["path"]), 0, int(split["train_prompts"])))
    return concat_traces(parts) if parts else None


def evaluate(predictor, trace: RoutingTrace, *, train: RoutingTrace | None = None, budgets: Sequence[int] = (),
             baselines: bool = True, num_experts: int | None = None) -> dict:
    """Score `trace` with the predictor (anything with scores(trace) → f32[N, L, E]) and, when `train` is
    given, the three baselines fitted on it. Returns {"predictor": report, "baselines": {name: report}, ...}."""
    t0 = time.perf_counter()
    scores = predictor.scores(trace)
    elapsed = time.perf_counter() - t0
    out = {"tokens": trace.num_tokens, "prompts": trace.num_prompts, "top_k": int(trace.experts.shape[-1]),
           "predictor": report(scores, trace.experts, budgets),
           "predictor_batch_s_per_token": elapsed / max(trace.num_tokens, 1)}
    E = num_experts or scores.shape[-1]
    uniform = trace.experts.shape[-1] / E
    out["mean_recall"] = out["predictor"]["mean_recall"]       # the predictor's, at the top level for scripts
    out["baselines"] = {"uniform": {"mean_recall": uniform}}
    if baselines and train is not None:
        for name, cls in BASELINES.items():
            out["baselines"][name] = report(cls(E).fit(train).scores(trace), trace.experts, budgets)
    return out


def step_latency(predictor, tokens: int = 64, batch: int = 1, context: int | None = None,
                 incremental: bool = True) -> dict:
    """Seconds per step of the step-by-step predictor (incremental: one new position with a key/value cache; else
    one forward over the last `context` tokens), after one warm-up."""
    ids = np.arange(tokens + 1) % 1000
    step = predictor.stepper(context=context, incremental=incremental)
    step.reset(predictor.cfg.num_layers, predictor.cfg.num_experts)
    step.predict(np.full(batch, ids[0]))
    times = []
    for t in ids[1:]:
        t0 = time.perf_counter()
        step.predict(np.full(batch, t))
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "context": step.context, "incremental": incremental, "steps": tokens,
            "median_s": float(np.median(times)),
            "p90_s": float(np.percentile(times, 90))}


def format_table(res: dict) -> str:
    """A markdown table of mean recall@K (and precision/recall at budgets) for the predictor and baselines."""
    K = res["top_k"]
    budgets = [b["budget"] for b in res["predictor"]["at_budget"]]
    head = f"| predictor | recall@{K} |" + "".join(f" P@{m} | R@{m} |" for m in budgets)
    lines = [head, "|" + "---|" * (2 + 2 * len(budgets))]
    rows = [("path predictor (ours)", res["predictor"])] + list(res["baselines"].items())
    for name, r in rows:
        cells = "".join(f" {b['precision']:.3f} | {b['recall']:.3f} |" for b in r.get("at_budget", [])) or \
            " — | — |" * len(budgets)
        lines.append(f"| {name} | {r['mean_recall']:.3f} |" + cells)
    return "\n".join(lines)
