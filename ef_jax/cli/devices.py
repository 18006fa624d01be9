"""`--devices N` for commands that decode: split every MoE layer's routed experts over N devices (ef_jax.mesh).

flags → check_devices (before any weight is read: N against the devices jax sees and the model's experts, and the
offload options a mesh runs) → load_mesh(args) → ef_jax.load(..., mesh=...)
"""
from __future__ import annotations

import argparse

from ef_jax.cli.guards import UsageError


def add_devices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="split every MoE layer's routed experts over the first N devices (default 1); each device "
                        "holds, caches and computes its own share, and --expert-memory / --slots-per-layer then "
                        "apply to each device")


def check_devices(args: argparse.Namespace, num_experts: int, policy: str | None) -> None:
    """UsageError for a --devices N this run cannot use; policy: the offload policy name (None: all resident)."""
    n = getattr(args, "devices", 1)
    if n == 1:
        return
    if n < 1:
        raise UsageError(f"--devices {n} must be ≥ 1")
    import jax
    seen = jax.devices()
    if n > len(seen):
        hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} makes {n}"
                if seen[0].platform == "cpu" else "")
        raise UsageError(f"--devices {n}: this machine has {len(seen)} {seen[0].platform} device"
                         f"{'' if len(seen) == 1 else 's'}{hint}")
    if n > num_experts:
        raise UsageError(f"--devices {n}: the model has {num_experts} experts per MoE layer, and every device must "
                         f"own at least one: use --devices {num_experts} or fewer")
    from ef_jax.engine.sources.mesh_experts import MESH_POLICIES
    if policy is not None and policy not in MESH_POLICIES:
        raise UsageError(f"--devices {n}: each device caches only its own experts, so the offload policy is one of "
                         f"{', '.join(MESH_POLICIES)} (--policy {policy} runs on one device)")
    if policy is not None and getattr(args, "expert_memory", None) == "auto":
        raise UsageError(f"--devices {n}: give --expert-memory per device as a size (e.g. 2GiB) or "
                         "--slots-per-layer; auto reads one device's free memory")
    if getattr(args, "step", "layer") == "device":
        raise UsageError(f"--devices {n}: --step device runs on one device; use --step layer")
    if getattr(args, "timeline", None):
        raise UsageError(f"--devices {n}: --timeline records one device's engine; drop it")


def load_mesh(args: argparse.Namespace) -> dict:
    """ef_jax.load keyword arguments for --devices (none for one device)."""
    n = getattr(args, "devices", 1)
    if n == 1:
        return {}
    from ef_jax.mesh import expert_mesh
    return {"mesh": expert_mesh(n)}
