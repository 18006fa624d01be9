"""Every command that decodes consults the one support table (ef_jax.cache.support) before any weight loads; this
module only maps its argument names to the commands' flags.

flags → check_run(...) → Request → support.check(request, FLAGS) → UsageError("--flag ...: fix")
"""
from __future__ import annotations

from ef_jax.cache import support
from ef_jax.cli.guards import UsageError

# the table's argument names → the flags that set them (names not here render as --name-with-dashes)
FLAGS = {"offload": "--expert-memory / --slots-per-layer", "record_timeline": "--timeline",
         "route_override": "--replay-routing"}


def check_run(*, offloaded: bool, policy: str, num_experts: int, num_moe_layers: int, step: str = "layer",
              devices: int = 1, timeline: bool = False, predictor: bool = False, hybrid: bool = False,
              auto_budget: bool = False, routing: str = "exact", timing: bool = False,
              host_memory: str = "pinned", host_compute: str = "never", expert_kernel: str = "xla",
              expert_dims: tuple[int, int] | None = None) -> None:
    """UsageError for the first support-table row this command line meets (policy: a registered name, or
    "resident" when nothing is offloaded; expert_dims: (D, F) of one routed expert)."""
    available = platform = None
    if devices > 1:
        import jax  # only for a mesh: how many devices this machine has
        available = jax.device_count()
    if expert_kernel != "xla":
        import jax  # only for a kernel that needs a platform: which one this machine runs
        platform = jax.default_backend()
    request = support.Request(offloaded=offloaded, policy=policy, step=step, devices=devices,
                              devices_available=available, num_experts=num_experts, num_moe_layers=num_moe_layers,
                              timeline=timeline, predictor_dir=predictor, hybrid=hybrid, auto_budget=auto_budget,
                              routing=routing, timing=timing, host_memory=host_memory, host_compute=host_compute,
                              expert_kernel=expert_kernel, platform=platform, expert_dims=expert_dims)
    try:
        support.check(request, FLAGS)
    except support.Unsupported as e:
        raise UsageError(str(e)) from None
