"""Build the default model:  python -m ef_jax.train {prepare,fit,card} ...

  python -m ef_jax.train prepare --data build/default_model_data
  python -m ef_jax.train fit --data build/default_model_data --out ef_jax/default_model [--cpu] [--max-minutes M]
  python -m ef_jax.train card --data build/default_model_data --model ef_jax/default_model --traces benchmarks/data
"""
from __future__ import annotations

import argparse
import sys

from ef_jax.train.config import CPU_OVERRIDES, TrainConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ef_jax.train", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch the corpus, train the tokenizer, write token streams")
    p.add_argument("--data", required=True)
    f = sub.add_parser("fit", help="train and export a Hugging Face checkpoint")
    f.add_argument("--data", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--cpu", action="store_true", help=f"CPU-sized schedule {CPU_OVERRIDES}")
    f.add_argument("--steps", type=int)
    f.add_argument("--batch-size", type=int)
    f.add_argument("--max-minutes", type=float)
    f.add_argument("--seed", type=int)
    c = sub.add_parser("card", help="measure the exported model and write its model card and routing traces")
    c.add_argument("--data", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--traces", default=None, help="directory for held-out routing traces (.npz)")
    c.add_argument("--trace-tokens", type=int, default=4096, help="traced held-out tokens per domain")
    args = ap.parse_args(argv)
    tc = TrainConfig()
    if args.cmd == "prepare":
        from ef_jax.train.prepare import prepare
        prepare(tc, args.data)
    elif args.cmd == "fit":
        from ef_jax.train.fit import fit
        if args.cpu:
            tc = tc.replace(**CPU_OVERRIDES)
        kw = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                ("max_minutes", args.max_minutes), ("seed", args.seed)) if v is not None}
        fit(tc.replace(**kw), args.data, args.out)
    else:
        from ef_jax.train.card import write_card
        write_card(args.data, args.model, traces_dir=args.traces, trace_tokens=args.trace_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
