"""Several devices: a Model placed on a 1-D mesh whose `expert` axis splits every MoE layer's routed experts.

ef_jax.load(path, mesh=expert_mesh(4)) | on_mesh(model, mesh) → Model(mesh=...): non-expert weights replicated on
every device of the mesh; routed experts stay on the host, and the Forward's mesh sources (ef_jax.engine.sources.mesh_experts)
give each device its share (ef_jax.cache.partition: E/n each, contiguous, uneven splits allowed) — all resident, or
its own slot pool, cache and pinned-host store when offloaded.

Several hosts: call jax.distributed.initialize() first in every process; jax.devices() then lists every host's devices
and a mesh over them spans the hosts (README "Several devices" says what is tested).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ef_jax.cache.partition import ExpertPartition

EXPERT_AXIS = "expert"


def expert_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named `expert` over the first `num_devices` devices (default: all of them)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive int")
    if n > len(devices):
        raise ValueError(f"num_devices={n} but this process sees {len(devices)} {devices[0].platform} device"
                         f"{'s' if len(devices) != 1 else ''}; on a CPU, XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n} (set before jax starts) makes {n}")
    return Mesh(np.asarray(devices[:n]), (EXPERT_AXIS,))


def check_axes(mesh) -> None:
    """TypeError / ValueError unless `mesh` is a 1-D jax Mesh whose axis is named `expert`."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((n,), ('{EXPERT_AXIS}',))), "
                        f"got {type(mesh).__name__}")
    if mesh.axis_names != (EXPERT_AXIS,):
        raise ValueError(f"mesh axes {mesh.axis_names} are not supported: ef_jax splits experts over one axis named "
                         f"'{EXPERT_AXIS}', e.g. jax.make_mesh((n,), ('{EXPERT_AXIS}',))")


def check_mesh(mesh, num_experts: int) -> ExpertPartition:
    """The expert partition of a mesh for a model with `num_experts` experts per MoE layer (ValueError when the mesh
    is not a 1-D mesh with an `expert` axis, or has more devices than experts)."""
    check_axes(mesh)
    return ExpertPartition(num_experts, int(mesh.devices.size))


def mesh_devices(mesh: Mesh) -> list:
    """The devices of the `expert` axis, in axis order (device d owns partition block d)."""
    return list(mesh.devices.flat)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def on_mesh(model, mesh):
    """`model` placed on `mesh`: every non-expert weight replicated on its devices (the routed experts stay on the
    host until a Forward gives each device its share). A model without MoE layers has nothing to split."""
    if not model.config.moe_layer_ids:
        raise ValueError("this model has no MoE layers: there are no experts to split over a mesh")
    check_mesh(mesh, model.config.num_experts)
    params = jax.device_put(model.params, replicated(mesh))
    return dataclasses.replace(model, params=params, mesh=mesh)
