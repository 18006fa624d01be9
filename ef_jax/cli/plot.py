"""`ef-jax plot-timeline`: a picture of a `--timeline` JSON (compute and host→device copies on one time axis).

TIMELINE.json (ef-jax generate --timeline) → ef_jax.plot.plot_timeline → --out PNG
"""
from __future__ import annotations

import argparse

from ef_jax.cli.guards import input_file


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot-timeline", help="draw a --timeline JSON as a PNG (needs the plot extra)",
                              description=__doc__.splitlines()[0])
    p.add_argument("timeline", help="a timeline JSON written by `ef-jax generate --timeline`")
    p.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ef_jax.plot import check_output, plot_timeline
    input_file("TIMELINE", args.timeline)
    check_output(args.out)
    plot_timeline(args.timeline, args.out)
    print(f"wrote {args.out}")
    return 0
