"""The engine layout: the import graph has no cycles and no upward imports, the host-only packages load without
jax, and running a model never changes it (tests for issue 12's bugs 2 and 3 live here too)."""
import ast
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig

ROOT = os.path.join(os.path.dirname(__file__), "..", "ef_jax")

# Lower layers never import higher ones. A package's own modules may import each other (acyclically).
LAYERS = [
    {"config", "trace", "generation_config", "lazy", "hub", "tokenizer_fast", "compile_cache", "interrupt",
     "progress", "plot", "pytree"},
    {"policies", "checkpoint", "models", "quant", "host_experts"},
    {"cache", "sched", "model", "mesh"},
    {"sim", "random_model", "random_checkpoint", "predict"},
    {"engine"},
    {"hybrid", "evalpolicy", "serve", "bench"},
    {"train"},
    {"cli"},
]
RANK = {name: r for r, names in enumerate(LAYERS) for name in names}
HOST_ONLY = ["ef_jax.cache", "ef_jax.policies", "ef_jax.sched", "ef_jax.sim", "ef_jax.trace"]


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules) -> set[str]:
    """Every ef_jax module `path` imports, at module level or inside functions (a lazy import is still an edge)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules and n.startswith("ef_jax.")}
    return found


def _unit(module: str) -> str:
    """The layer unit of a module: its package under ef_jax (every command lives in ef_jax.cli)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ef_jax"


def _graph():
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def test_import_graph_has_no_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its children is not a dependency of the children on the package
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_no_upward_imports():
    bad = []
    for m, deps in _graph().items():
        if m == "ef_jax":
            continue  # the curated public surface re-exports from every layer (lazily)
        for d in deps:
            a, b = _unit(m), _unit(d)
            if a != b and RANK[b] > RANK[a]:
                bad.append(f"{m} ({a}, layer {RANK[a]}) imports {d} ({b}, layer {RANK[b]})")
    assert not bad, "\n".join(bad)


# Inside the engine, the same rule between its sub-packages: what moves bytes and counts them, the compiled
# programs, the expert sources, the one forward, the decode loop and its APIs.
ENGINE_LAYERS = [{"telemetry"}, {"transfer"}, {"programs"}, {"sources"}, {"forward"}, {"loop"}]
ENGINE_RANK = {name: r for r, names in enumerate(ENGINE_LAYERS) for name in names}


def test_engine_sub_packages_import_downward_only():
    graph = _graph()
    engine = {m: deps for m, deps in graph.items() if m.startswith("ef_jax.engine.")}
    assert {m.split(".")[2] for m in engine} == set(ENGINE_RANK), "a new engine sub-package needs a rank here"
    bad = []
    for m, deps in engine.items():
        for d in deps:
            if d.startswith("ef_jax.engine."):
                a, b = m.split(".")[2], d.split(".")[2]
                if a != b and ENGINE_RANK[b] > ENGINE_RANK[a]:
                    bad.append(f"{m} ({a}) imports {d} ({b})")
    assert not bad, "\n".join(bad)


def test_every_package_has_a_layer():
    assert {_unit(m) for m in _graph()} - {"ef_jax"} <= set(RANK)


def test_host_only_packages_import_no_jax():
    """ef_jax/cache (and the rest of the host-side decision code) imports no jax, flax or chex, directly or
    through other ef_jax modules: checked by importing them in a fresh interpreter."""
    code = ("import sys; " + "; ".join(f"import {m}" for m in HOST_ONLY) +
            "; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'chex'));"
            " print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ef_jax.load(tiny_checkpoint("qwen2moe-norm-sparse-step"))


def test_offloaded_run_does_not_change_the_model(model):
    """Bug 3: building the offloaded forward dropped the model's resident experts (model.release_resident())."""
    from ef_jax.engine.sources.experts import resident_pools
    pools = resident_pools(model)
    before = {f.name: id(getattr(model, f.name)) for f in dataclasses.fields(model)}
    ef_jax.generate(model, [[3, 5, 7]], max_new_tokens=2, offload=OffloadConfig(slots_per_layer=model.config.top_k))
    assert resident_pools(model) is pools
    assert {f.name: id(getattr(model, f.name)) for f in dataclasses.fields(model)} == before


def test_layers_per_group_applies_to_offloaded_runs(model):
    """Bug 2: generate(layers_per_group=...) was ignored when offload was set."""
    offload = OffloadConfig(slots_per_layer=model.config.num_experts)
    one = ef_jax.generate(model, [[3, 5, 7]], max_new_tokens=3, offload=offload, layers_per_group=1)
    four = ef_jax.generate(model, [[3, 5, 7]], max_new_tokens=3, offload=offload)
    assert one.stats["layers_per_group"] == 1 and four.stats["layers_per_group"] == 4
    assert one.tokens == four.tokens == ef_jax.generate(model, [[3, 5, 7]], max_new_tokens=3).tokens


def test_sync_points_are_named_and_counted(model):
    """Offloaded decoding syncs once per MoE layer on the routing and once per step on the sampled token."""
    cfg = model.config
    res = ef_jax.generate(model, [[3, 5, 7], [9, 2]], max_new_tokens=4,
                          offload=OffloadConfig(slots_per_layer=cfg.top_k, policy="lru"))
    steps = res.stats["cache_steps"]
    assert res.stats["sync_points"] == {"route": steps * cfg.num_moe_layers, "sample": steps}
    resident = ef_jax.generate(model, [[3, 5, 7], [9, 2]], max_new_tokens=4)
    assert resident.stats["sync_points"] == {"sample": 4} and resident.tokens == res.tokens


def test_dense_layers_join_the_next_routing_program():
    """Per MoE layer two programs: the last ≤ layers_per_group dense layers before it run inside its attention +
    route program; longer dense runs and trailing dense layers run in groups of ≤ layers_per_group."""
    from ef_jax.engine.forward.forward import split_segments
    assert split_segments([0, 0, 0, 0, 0, 1, 0, 1, 0, 0], 2) == [
        ("dense", (0, 1)), ("dense", (2,)), ("moe", (3, 4, 5)), ("moe", (6, 7)), ("dense", (8, 9))]
    assert split_segments([1, 1], 4) == [("moe", (0,)), ("moe", (1,))]
    covered = [i for _, layers in split_segments([0, 1, 0, 0, 0, 1, 0], 1) for i in layers]
    assert covered == list(range(7))
