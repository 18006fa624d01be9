"""`ef-jax convert`: write a checkpoint's converted store (routed experts quantized and packed, orbax-checkpoint).

[--model DIR (HF checkpoint)] → ef_jax.quant.store.convert → [--out STORE]; later `ef_jax.load(STORE)` /
`--model STORE` reads the experts already quantized (no quantization, no repacking).
"""
from __future__ import annotations

import argparse

from ef_jax.quant.formats import BITS, DEFAULT_GROUP_SIZE


def add_load_args(p: argparse.ArgumentParser, decodes: bool = True) -> None:
    """--expert-dtype / --group-size (and, for a command that decodes, --expert-kernel) for a command that loads a
    model; pass `load_kwargs(args)` to ef_jax.load."""
    p.add_argument("--expert-dtype", choices=["bf16", *sorted(BITS)], default=None,
                   help="routed experts: bf16 (as --dtype), int8 or int4 (quantized at load; default: not quantized)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"rows per quantization group (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--no-quant-cache", dest="quant_cache", action="store_false",
                   help="quantize at load without reading or writing the cache of quantized experts "
                        "(EF_JAX_CACHE_DIR, default ~/.cache/ef_jax)")
    if decodes:  # ef_jax.load(expert_kernel=...): the model's expert FFN in every program that computes experts
        p.add_argument("--expert-kernel", choices=["xla", "pallas"], default="xla",
                       help="how routed experts are multiplied: xla (gather / ragged_dot) or pallas "
                            "(kernels_pallas.expert_ffn, Triton on an NVIDIA GPU, tile sizes from "
                            "kernels_pallas/tuned.json)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """ef_jax.load keyword arguments from add_load_args' flags ("bf16" means: experts as --dtype)."""
    dt = args.expert_dtype
    kw = {"expert_dtype": None if dt == "bf16" else dt, "group_size": args.group_size}
    if not args.quant_cache:
        kw["quant_cache"] = False
    if "expert_kernel" in vars(args):  # add_load_args(decodes=False) declares no kernel
        kw["expert_kernel"] = args.expert_kernel
    return kw


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `convert` on an argparse subparsers object; its default `fn` is `run`."""
    p = subparsers.add_parser("convert", help="write a quantized, packed expert store (orbax) from a checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    p.add_argument("--out", required=True, help="store directory to create (written atomically)")
    p.add_argument("--expert-dtype", choices=sorted(BITS), default="int4", help="routed-expert dtype (default int4)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"rows per quantization group along each expert matrix's input axis (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype of the non-expert weights in the store (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ef_jax import hub
    from ef_jax.model import DEFAULT_MODEL_DIR
    from ef_jax.quant.store import convert
    m = convert(hub.resolve(args.model) or DEFAULT_MODEL_DIR, args.out, expert_dtype=args.expert_dtype,
                group_size=args.group_size, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(m['moe_layers'])} MoE layers of {m['expert_dtype']} experts (group {m['group_size']}, "
          f"{m['method']}{', symmetric' if m['symmetric'] else ''}), {m['bytes_per_expert']:,} bytes per expert; "
          f"non-expert weights {m['dtype']}; from {m['source']['path']}")
    return 0
