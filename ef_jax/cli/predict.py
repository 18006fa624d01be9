"""`ef-jax train-predictor` and `ef-jax eval-predictor`: the routing-path predictor from the command line.

train-predictor TRACE.npz [...] --out DIR → train.train_predictor → DIR/{config.json, vocab.json, params/}
eval-predictor DIR TRACE.npz [--json]    → evaluate.evaluate (held-out prompts when DIR was trained on TRACE)
"""
from __future__ import annotations

import argparse
import json
import sys

from ef_jax.trace import load_trace


def add_parser(subparsers) -> None:
    """Register train-predictor and eval-predictor on an argparse subparsers object (dispatch on `fn`)."""
    t = subparsers.add_parser("train-predictor", help="train the routing-path predictor on routing traces",
                              description="Train the ExpertFlow routing-path predictor (Flax) on .npz traces.")
    t.add_argument("traces", nargs="+", metavar="TRACE.npz", help="routing traces of one model")
    t.add_argument("--out", required=True, help="directory for config.json, vocab.json and the orbax checkpoint")
    t.add_argument("--max-minutes", type=float, default=15.0, help="wall-clock training budget (default 15)")
    t.add_argument("--max-steps", type=int, default=3000, help="training steps at most")
    t.add_argument("--seed", type=int, default=0, help="PRNG seed")
    t.add_argument("--train-prompts", type=int, default=None,
                   help="train on each trace's first N prompts, validate on the rest (default: first 80%%)")
    t.add_argument("--batch", type=int, default=32, help="windows per step")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    t.add_argument("--d-model", type=int, default=128, help="model width")
    t.add_argument("--depth", type=int, default=2, help="transformer blocks")
    t.add_argument("--window", type=int, default=128, help="positions per window (context length)")
    t.add_argument("--no-prev-route", action="store_true", help="token ids only (no previous-token route input)")
    t.add_argument("--ngram-buckets", type=int, default=4096,
                   help="hashed character-trigram buckets for unknown/rare tokens (0: off; default 4096)")
    t.add_argument("--token-rank", type=int, default=256,
                   help="rank of the per-token route table added to the logits (0: off; default 256)")
    t.add_argument("--eval-every", type=int, default=200, help="steps between validation passes (0: only at the end)")
    t.set_defaults(fn=run_train)

    e = subparsers.add_parser("eval-predictor", help="recall@K of a trained predictor vs the baselines",
                              description="Evaluate a trained routing-path predictor against the baselines.")
    e.add_argument("dir", help="a train-predictor --out directory")
    e.add_argument("trace", metavar="TRACE.npz")
    e.add_argument("--budget", type=int, action="append", default=None,
                   help="prefetch budget m per layer for precision/recall (repeatable; default K and 2K)")
    e.add_argument("--json", action="store_true", help="print one JSON object (top-level mean_recall)")
    e.set_defaults(fn=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from ef_jax.cli.guards import input_npz, output_dir, positive
    from ef_jax.predict.train import TrainConfig, train_predictor
    for flag, value in (("--max-steps", args.max_steps), ("--batch", args.batch), ("--d-model", args.d_model),
                        ("--depth", args.depth), ("--window", args.window)):
        positive(flag, value)
    positive("--eval-every", args.eval_every, minimum=0)  # 0: validate only at the end
    positive("--train-prompts", args.train_prompts)
    for p in args.traces:
        input_npz("TRACE.npz", p, "`ef-jax trace`")
    output_dir("--out", args.out)
    traces = [load_trace(p) for p in args.traces]
    tc = TrainConfig(batch=args.batch, max_steps=args.max_steps, max_minutes=args.max_minutes, lr=args.lr,
                     seed=args.seed, eval_every=args.eval_every)
    train_predictor(traces, args.traces, args.out, tc=tc, train_prompts=args.train_prompts, d_model=args.d_model,
                    depth=args.depth, window=args.window, prev_route=not args.no_prev_route,
                    ngram_buckets=args.ngram_buckets, token_rank=args.token_rank,
                    log=lambda s: print(s, flush=True))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ef_jax.predict.evaluate import eval_split, evaluate, format_table, training_trace
    from ef_jax.predict.runtime import TrainedPredictor
    from ef_jax.predict.train import prompt_slice
    from ef_jax.cli.guards import input_dir, input_npz, positive
    input_dir("DIR", args.dir, "config.json", "`ef-jax train-predictor --out`")
    input_npz("TRACE.npz", args.trace, "`ef-jax trace`")
    for m in args.budget or []:
        positive("--budget", m)
    pred = TrainedPredictor.load(args.dir)
    full = load_trace(args.trace)
    start, stop = eval_split(full, pred.meta)
    if start >= stop:
        raise ValueError(f"{args.trace}: every prompt was used to train {args.dir}; evaluate on another trace")
    trace = prompt_slice(full, start, stop)
    K = trace.experts.shape[-1]
    budgets = args.budget or [K, 2 * K]
    res = evaluate(pred, trace, train=training_trace(pred.meta), budgets=budgets,
                   num_experts=pred.cfg.num_experts)
    res["prompts_evaluated"] = [start, stop]
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.trace}: prompts {start}..{stop - 1} ({res['tokens']} tokens), recall@{K}")
        print(format_table(res))
        lookup = res["baselines"].get("token_lookup", {}).get("layer_recall")
        print("per layer (predictor" + (" / token lookup" if lookup else "") + "):")
        for l, r in enumerate(res["predictor"]["layer_recall"]):
            print(f"  layer {l:2d}: {r:.3f}" + (f" / {lookup[l]:.3f}" if lookup else ""))
    return 0


def main(argv=None) -> int:  # `python -m ef_jax.cli.predict ...` without the top-level CLI
    ap = argparse.ArgumentParser(prog="ef-jax")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
