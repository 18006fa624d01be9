"""`--devices N` and `--step layer|device` for every command that decodes: where the experts live and which
program runs them (ef_jax.mesh, OffloadConfig.step).

flags → ef_jax.cli.support.check_run (before any weight is read: N against the devices jax sees and the model's
experts, and the offload options a mesh runs, from the support table) → load_mesh(args) → ef_jax.load(mesh=...)
"""
from __future__ import annotations

import argparse


def add_devices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="split every MoE layer's routed experts over the first N devices (default 1); each device "
                        "holds, caches and computes its own share, and --expert-memory / --slots-per-layer then "
                        "apply to each device")


def add_step_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", choices=["layer", "device"], default="layer",
                   help="offloaded decoding: layer (the host routes each MoE layer) or device (the whole token step "
                        "and the expert cache in one compiled program; lru, nocache and hint policies)")


def load_mesh(args: argparse.Namespace) -> dict:
    """ef_jax.load keyword arguments for --devices (none for one device)."""
    if args.devices == 1:
        return {}
    from ef_jax.mesh import expert_mesh
    return {"mesh": expert_mesh(args.devices)}
