"""The support table: every combination ef_jax refuses, in one place, checked before any weight loads.

request (OffloadConfig + the run's other choices: mesh size, route override, the model's expert kernel, CLI-only
flags) → Request
→ check(request) → ValueError naming the argument and the fix (the API) | UsageError naming the flag (the CLI)

Each row is (argument, condition, message). The API (OffloadConfig, Forward and so ef_jax.generate / logits /
evaluate_policy), every CLI command and the server consult it; the CLI only maps argument names to its flags
(`flags=`). A message names arguments as <name> or <name=value>; they render as `name='value'` for the API and
`--flag value` for the CLI. What an expert source cannot do is a row here, so no source silently ignores an option.

Host-only: no jax (the CLI checks its flags before importing it).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from ef_jax.policies.registry import POLICIES, PolicySpec, policy_label

# the policies the device step runs as array operations inside its program (ef_jax.engine.programs.device_policies
# KINDS; tests/cache/test_support.py checks the two agree)
DEVICE_POLICIES = ("nocache", "lru", "lfu", "pregate", "expertflow", "predictive")
MESH_POLICIES = ("lru", "lfu", "nocache")   # a device's cache sees only its own experts: no predictor
# step="device" on a mesh (ef_jax.engine.programs.mesh_step): each device's policy decides from its own experts'
# routing (and, scoring, its own columns of every router's top-k), with no state shared across devices
MESH_DEVICE_POLICIES = ("nocache", "lru", "lfu", "pregate", "expertflow")


@dataclasses.dataclass(frozen=True)
class Request:
    """One run's choices, as the table reads them (a field the caller cannot know yet stays None)."""
    offloaded: bool                 # an OffloadConfig (or a CLI budget) was given
    policy: str = "resident"        # the policy's name ("resident" when nothing is offloaded)
    policy_by_name: bool = True     # a name or PolicySpec (False: a Policy object)
    predictor: bool = False         # the PolicySpec carries a predictor (or scores) of its own
    step: str = "layer"
    routing: str = "exact"
    timing: bool = False            # a virtual clock
    timeline: bool = False          # record_timeline
    transfers: bool = False         # transfers= given explicitly
    layers_per_group: bool = False  # layers_per_group= given explicitly
    auto_budget: bool = False       # expert_memory="auto"
    host_memory: str = "pinned"     # "pinned" | "mapped"
    host_compute: str = "never"     # "never" | "auto" | "always"
    devices: int = 1                # devices of the expert mesh
    devices_available: int | None = None  # devices the machine has (None: not checked here)
    num_experts: int | None = None
    num_moe_layers: int | None = None
    route_override: bool = False
    hybrid: bool = False            # CLI --hybrid (the predictor of expertflow)
    predictor_dir: bool = False     # CLI --predictor (the predictor of predictive)
    where: str = "engine"           # "engine" | "batched-replay"
    expert_kernel: str = "xla"      # the model's expert FFN (Model.expert_kernel, CLI --expert-kernel)
    platform: str | None = None     # jax's backend ("cpu", "gpu", ...; None: not checked here)
    expert_dims: tuple[int, int] | None = None  # (D, F) of one routed expert (None: not checked here)

    @classmethod
    def of(cls, offload: Any, **kw) -> "Request":
        """From an OffloadConfig (or None: all resident) and the run's other choices (Request fields)."""
        if offload is None:
            return cls(offloaded=False, **kw)
        # the type is checked by name, not imported: ef_jax.cache.config consults this table in __post_init__
        if type(offload).__name__ != "OffloadConfig":
            raise TypeError(f"offload must be an ef_jax.OffloadConfig or None, got {type(offload).__name__}")
        kw.setdefault("layers_per_group", offload.layers_per_group is not None)
        return cls(offloaded=True, policy=policy_label(offload.policy), policy_by_name=by_name(offload.policy),
                   predictor=has_predictor(offload.policy), step=offload.step, routing=offload.routing,
                   timing=offload.timing is not None, timeline=offload.record_timeline is not None,
                   transfers=offload.transfers is not None, auto_budget=offload.auto,
                   host_memory=offload.host_memory, host_compute=offload.host_compute, **kw)

    def replace(self, **kw) -> "Request":
        return dataclasses.replace(self, **kw)


def by_name(policy) -> bool:
    return isinstance(policy, (str, PolicySpec))


def has_predictor(policy) -> bool:
    """Whether a policy spec carries its own predictor: a Policy object does; a name never; a PolicySpec when it
    passes predictor= or scores=."""
    if isinstance(policy, str):
        return False
    if isinstance(policy, PolicySpec):
        return policy.kwargs.get("predictor") is not None or policy.kwargs.get("scores") is not None
    return True


def needs_future(name: str) -> bool:
    """A registered policy that reads the whole future routing (an offline oracle: the simulator's)."""
    factory = POLICIES.get(name)
    return factory is not None and factory.needs_future


@dataclasses.dataclass(frozen=True)
class Row:
    argument: str                      # the argument the fix changes (the CLI maps it to a flag)
    condition: Callable[[Request], bool]
    message: str                       # <name> / <name=value> render per caller; {r.field} reads the request


_MESH = lambda r: r.devices > 1 and r.offloaded  # noqa: E731
_DEVICE = lambda r: r.offloaded and r.step == "device"  # noqa: E731

ROWS: tuple[Row, ...] = (
    # what any offloaded run needs
    Row("offload", lambda r: r.offloaded and r.num_moe_layers == 0,
        "this model has no MoE layers: there is nothing to offload (drop <offload>)"),
    Row("policy", lambda r: r.where == "engine" and r.offloaded and needs_future(r.policy),
        "policy {r.policy!r} is an offline oracle that needs every future token's routing, which decoding cannot "
        "know: replay a routing trace with `ef-jax sim TRACE --policy {r.policy}` (ef_jax.sim.replay), or choose "
        "an online <policy>"),
    Row("policy", lambda r: r.where == "batched-replay" and needs_future(r.policy),
        "policy {r.policy!r} needs a fixed-width future; batched replay runs online policies (replay one token "
        "per step with ef_jax.sim.replay)"),
    Row("policy", lambda r: r.offloaded and r.policy == "predictive" and not (r.predictor or r.predictor_dir),
        "<policy=predictive> needs a predictor: a trained one (<predictor=DIR>, from `ef-jax train-predictor`; in "
        "Python PolicySpec('predictive', predictor=TrainedPredictor.load(DIR).stepper(...))), or "
        "PolicySpec('predictive', predictor='online') for an online lookup table"),
    Row("predictor", lambda r: r.predictor_dir and r.policy != "predictive",
        "<predictor> is the predictor of policy predictive: add <policy=predictive>"),
    Row("hybrid", lambda r: r.hybrid and r.policy != "expertflow",
        "<hybrid> is the predictor of policy expertflow: add <policy=expertflow>"),
    Row("route_override", lambda r: r.route_override and not r.offloaded,
        "route_override rewrites the routing the host reads, and a resident run reads none: give <offload>"),
    Row("record_timeline", lambda r: r.timeline and not r.offloaded,
        "<record_timeline> records the offload engine: give <expert_memory> or <slots_per_layer> too"),
    Row("host_compute", lambda r: r.host_compute != "never" and not r.offloaded,
        "<host_compute={r.host_compute}> decides what an offloaded miss becomes: give <expert_memory> or "
        "<slots_per_layer> too, or drop it"),
    # step="device": the expert cache inside the step program
    Row("step", lambda r: r.step == "device" and not r.offloaded,
        "<step=device> runs the expert cache inside the step: give <expert_memory> or <slots_per_layer> too "
        "(without them every expert is resident anyway)"),
    Row("policy", lambda r: _DEVICE(r) and not (r.policy_by_name and r.policy in DEVICE_POLICIES),
        "<step=device> runs its policies as array operations inside the step program, by name ("
        f"{', '.join(DEVICE_POLICIES)}); <policy={{r.policy}}> decides evictions on the host: use <step=layer>"),
    Row("predictor", lambda r: _DEVICE(r) and r.predictor_dir,
        "<step=device> predicts with its routing-path table on the device; a trained <predictor> runs on the host: "
        "use <step=layer>"),
    Row("timing", lambda r: _DEVICE(r) and r.timing,
        "<timing> (a virtual clock) charges each copy on the host: use <step=layer>"),
    Row("transfers", lambda r: _DEVICE(r) and r.transfers,
        "<transfers> chooses how the layer mode's host copies travel; <step=device> copies inside the step "
        "program: drop <transfers> or use <step=layer>"),
    Row("layers_per_group", lambda r: _DEVICE(r) and r.layers_per_group,
        "<layers_per_group> groups the layer mode's programs; <step=device> runs every layer in one program: "
        "drop <layers_per_group> or use <step=layer>"),
    Row("route_override", lambda r: _DEVICE(r) and r.route_override,
        "route_override rewrites each layer's routing on the host; <step=device> routes inside the step program: "
        "use <step=layer>"),
    Row("host_memory", lambda r: _DEVICE(r) and r.host_memory == "mapped",
        "<host_memory=mapped> reads each copied expert on the host, and <step=device> copies inside its program "
        "from the pinned store: use <step=layer> or <host_memory=pinned>"),
    Row("host_compute", lambda r: _DEVICE(r) and r.host_compute != "never",
        "<host_compute={r.host_compute}> runs in the layer mode only: the device step has no host share "
        "(docs/host_compute.md says why): use <step=layer> or <host_compute=never>"),
    # a mesh: each device holds, caches and computes its own share of the experts
    Row("devices", lambda r: r.devices < 1, "<devices={r.devices}> must be ≥ 1"),
    Row("devices", lambda r: r.devices_available is not None and r.devices > r.devices_available,
        "<devices={r.devices}>: this machine has {r.devices_available} devices; on a CPU, "
        "XLA_FLAGS=--xla_force_host_platform_device_count={r.devices} makes {r.devices}"),
    Row("devices", lambda r: r.num_experts is not None and r.devices > r.num_experts,
        "<devices={r.devices}>: the model has {r.num_experts} experts per MoE layer, and every device must own at "
        "least one: use <devices={r.num_experts}> or fewer"),
    Row("policy", lambda r: _MESH(r) and r.step != "device" and not (r.policy_by_name and r.policy in MESH_POLICIES),
        "on a mesh of <devices={r.devices}> each device caches only its own experts, so the offload policy is one "
        f"of {', '.join(MESH_POLICIES)} by name; <policy={{r.policy}}> runs on one device"),
    Row("policy", lambda r: _MESH(r) and r.step == "device"
        and not (r.policy_by_name and r.policy in MESH_DEVICE_POLICIES),
        "<step=device> on a mesh of <devices={r.devices}> runs one cache per device inside one shard_map, each "
        "deciding from its own experts' routing, so the policy is one of "
        f"{', '.join(MESH_DEVICE_POLICIES)}; <policy={{r.policy}}> keeps one routing-path table over every expert "
        "(no device holds it): use one device (drop <devices>)"),
    Row("hybrid", lambda r: _MESH(r) and r.step == "device" and r.policy == "expertflow" and (r.hybrid or r.predictor),
        "<step=device> on a mesh of <devices={r.devices}> scores with plain pre-gating on each device; expertflow's "
        "hybrid head <hybrid> runs inside the step on one device only: drop <devices>, or the head"),
    Row("routing", lambda r: _MESH(r) and r.routing != "exact",
        "<routing=cache-aware> reads one device's cache: use <routing=exact> on a mesh of <devices={r.devices}>"),
    Row("timing", lambda r: _MESH(r) and r.timing,
        "<timing> (a virtual clock) models one copy stream: leave it out on a mesh of <devices={r.devices}>"),
    Row("record_timeline", lambda r: _MESH(r) and r.timeline,
        "<record_timeline> records one device's engine: leave it out on a mesh of <devices={r.devices}>"),
    Row("expert_memory", lambda r: _MESH(r) and r.auto_budget,
        "<expert_memory=auto> reads one device's free memory: on a mesh of <devices={r.devices}> give the budget "
        "per device as bytes "
        "(e.g. <expert_memory=2GiB>) or <slots_per_layer>"),
    Row("transfers", lambda r: _MESH(r) and r.transfers,
        "<transfers> is for one device; on a mesh of <devices={r.devices}> each device copies inline: drop "
        "<transfers>"),
    Row("host_memory", lambda r: _MESH(r) and r.host_memory == "mapped",
        "<host_memory=mapped> is for one device: pin the experts on a mesh of <devices={r.devices}> "
        "(<host_memory=pinned>)"),
    Row("host_compute", lambda r: _MESH(r) and r.host_compute != "never",
        "<host_compute={r.host_compute}> computes a miss on the host of one device; a mesh of <devices={r.devices}> "
        "has no host share per device (not built): use <host_compute=never> or one device"),
    Row("route_override", lambda r: _MESH(r) and r.route_override,
        "route_override is not applied on a mesh of <devices={r.devices}>: use one device"),
    # the expert kernel (any source, resident or offloaded: every program that computes experts takes it)
    Row("expert_kernel", lambda r: r.expert_kernel == "pallas" and r.platform not in (None, "gpu"),
        "<expert_kernel=pallas> lowers kernels_pallas.expert_ffn with Triton for an NVIDIA GPU, and this run's "
        "platform is {r.platform}: use <expert_kernel=xla>"),
    Row("expert_kernel", lambda r: r.expert_kernel == "pallas" and r.expert_dims is not None
        and any(n % 16 for n in r.expert_dims),
        "<expert_kernel=pallas> tiles the model width D and the expert width F in multiples of 16 (Triton's dot "
        "minimum); this model has (D, F) = {r.expert_dims}: use <expert_kernel=xla>"),
)

API_NAMES = {"offload": "offload=OffloadConfig(...)",
             "hybrid": "PolicySpec('expertflow', predictor=HybridPredictor(...))"}  # the API's --hybrid


def _render(text: str, flags: dict[str, str] | None) -> str:
    """<name> / <name=value> → the API's spelling (name='value') or, given `flags`, the CLI's (--flag value)."""
    def one(m):
        name, value = m.group(1), m.group(2)
        if flags is None:
            if name == "devices":  # the API's mesh= argument, by its size
                return f"{value} devices" if value else "mesh="
            base = API_NAMES.get(name, name)
            if value is None:
                return base + ("" if base.endswith(")") else "=")
            return f"{base}={value}" if value.isdigit() else f"{base}={value!r}"
        flag = flags.get(name, "--" + name.replace("_", "-"))
        return flag if value is None else f"{flag} {value}"
    return re.sub(r"<(\w+)(?:=([^>]*))?>", one, text)


def problems(request: Request, flags: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Every row `request` meets: (argument, message), in table order."""
    return [(row.argument, _render(row.message.format(r=request), flags)) for row in ROWS if row.condition(request)]


class Unsupported(ValueError):
    """A combination the support table refuses; `argument` names what to change."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def check(request: Request, flags: dict[str, str] | None = None) -> None:
    """Unsupported (a ValueError) for the first row `request` meets; flags: the CLI's argument → flag names."""
    found = problems(request, flags)
    if found:
        raise Unsupported(*found[0])
