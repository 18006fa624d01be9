"""`ef-jax record` and `ef-jax train-hybrid`: capture hidden states and routes through the engine, then train and
evaluate the hybrid cross-layer predictor (recall@K by distance, pre-gate alone vs hybrid, exponential fits).

record: [--text FILE] → ef_jax.hybrid.record → REC.npz;   train-hybrid: REC.npz → train_from_record → DIR
"""
from __future__ import annotations

import argparse
import json
import math
from ef_jax.cli.convert import add_load_args, load_kwargs


def add_parser(subparsers) -> None:
    """Register `record` and `train-hybrid` on an argparse subparsers object."""
    r = subparsers.add_parser("record", help="record hidden states, token ids and routes of a text (for train-hybrid)")
    r.add_argument("--model", default=None, help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    r.add_argument("--text", required=True, help="text file (token ids separated by spaces for tokenizer-less models)")
    r.add_argument("--out", required=True, help="output .npz (.npz is appended if missing)")
    r.add_argument("--seq-len", type=int, default=256, help="tokens per recorded chunk")
    r.add_argument("--max-tokens", type=int, default=None, help="record at most this many tokens")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    add_load_args(r)
    r.add_argument("--point", choices=["moe", "attention"], default="moe",
                   help="hidden states after each MoE layer (moe) or after its attention, the MoE input (attention); "
                        "expertflow with the trained head predicts from the same point")
    r.set_defaults(fn=run_record)
    t = subparsers.add_parser("train-hybrid", help="train the hybrid cross-layer expert predictor on a record")
    t.add_argument("record", help="an `ef-jax record` .npz")
    t.add_argument("--out", required=True, help="output directory (params.npz, config.json, report.json)")
    t.add_argument("--steps", type=int, default=2000, help="training steps")
    t.add_argument("--max-distance", type=int, default=8, help="predict up to this many MoE layers ahead")
    t.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget (default: none)")
    t.add_argument("--val-frac", type=float, default=0.2, help="last fraction of tokens held out for evaluation")
    t.add_argument("--seed", type=int, default=0, help="PRNG seed")
    t.add_argument("--json", action="store_true", help="print the report as one JSON object")
    t.set_defaults(fn=run_train)


def run_record(args: argparse.Namespace) -> int:
    import ef_jax
    from ef_jax.cli.guards import output_file, positive, read_text
    from ef_jax.cli.model import parse_ids, preflight
    positive("--seq-len", args.seq_len)
    positive("--max-tokens", args.max_tokens)
    pf = preflight("--model", args.model)
    text = read_text("--text", args.text)
    if pf.tokenizer is not None:
        ids = list(pf.tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = parse_ids("--text (this checkpoint has no tokenizer, so it must hold token ids)", text,
                        pf.config.vocab_size)
    out = output_file("--out", args.out, ".npz")  # numpy's savez appends .npz: report the real name
    from ef_jax.cli.support import check_run
    check_run(offloaded=False, policy="resident", num_experts=pf.config.num_experts,
              num_moe_layers=pf.config.num_moe_layers, expert_kernel=args.expert_kernel,
              expert_dims=(pf.config.hidden_size, pf.config.moe_intermediate))
    from ef_jax.hybrid.record import record
    model = ef_jax.load(pf.path, dtype=args.dtype, **load_kwargs(args))
    rec = record(model, ids, seq_len=args.seq_len, max_tokens=args.max_tokens, point=args.point)
    rec.save(out)
    N, L, D = rec.hidden.shape
    print(f"wrote {out}: {N} tokens × {L} MoE layers (hidden D={D} at the {args.point} point, "
          f"top-{rec.experts.shape[-1]})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ef_jax.cli.guards import input_npz, output_dir, positive
    from ef_jax.hybrid.predictor import train_from_record
    from ef_jax.hybrid.record import Record
    positive("--steps", args.steps)
    positive("--max-distance", args.max_distance)
    if not 0 < args.val_frac < 1:
        raise ValueError(f"--val-frac {args.val_frac} must be in (0, 1)")
    input_npz("RECORD", args.record, "`ef-jax record`")
    output_dir("--out", args.out)
    rec = Record.load(args.record)
    report = train_from_record(rec, args.out, max_distance=args.max_distance, steps=args.steps,
                               val_frac=args.val_frac, seed=args.seed,
                               max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                               log=(lambda s: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
    return 0


def _fmt(x: float) -> str:
    return "  -  " if math.isnan(x) else f"{x:.3f}"


def table(r: dict) -> str:
    lines = [f"recall@{r['top_k']} on {r['tokens_val']} held-out tokens by distance s (layers ahead"
             f"{', from the ' + r['point'] + ' point' if 'point' in r else ''})",
             "s        " + " ".join(f"{s:>5}" for s in r["distances"]),
             "pregate  " + " ".join(f"{_fmt(x):>5}" for x in r["recall_pregate"]),
             "hybrid   " + " ".join(f"{_fmt(x):>5}" for x in r["recall_hybrid"])]
    for name in ("pregate", "hybrid"):
        f = r[f"fit_{name}"]
        lines.append(f"fit {name}: {f['a']:.3f}·e^(−{f['b']:.3f} s) + {f['c']:.3f} (rmse {f['rmse']:.3f})")
    return "\n".join(lines)
