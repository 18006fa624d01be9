"""The support table (ef_jax.cache.support): every row is reachable, renders in API and CLI spelling, and refuses
through the API before any work (the CLI's side: tests/cli/test_cli_guards.py, SUPPORT_CASES)."""
import jax
import pytest

import ef_jax
from ef_jax import OffloadConfig, PolicySpec
from ef_jax.cache import support
from ef_jax.cache.support import ROWS, Request, Unsupported, problems
from ef_jax.policies import LRU

R = Request
def dev(**kw):
    return R(**{"offloaded": True, "policy": "lru", "step": "device", **kw})


def mesh(**kw):
    return R(**{"offloaded": True, "policy": "lru", "devices": 2, **kw})


# one request per row (in table order): each meets that row first
REQUESTS = [
    R(offloaded=True, num_moe_layers=0),
    R(offloaded=True, policy="belady"),
    R(offloaded=True, policy="belady", where="batched-replay"),
    R(offloaded=True, policy="predictive"),
    R(offloaded=True, predictor_dir=True),
    R(offloaded=True, hybrid=True),
    R(offloaded=False, route_override=True),
    R(offloaded=False, timeline=True),
    R(offloaded=False, host_compute="auto"),
    R(offloaded=False, step="device"),
    dev(policy="LRU", policy_by_name=False),
    dev(policy="predictive", predictor_dir=True),
    dev(timing=True),
    dev(transfers=True),
    dev(layers_per_group=True),
    dev(route_override=True),
    dev(host_memory="mapped"),
    dev(host_compute="always"),
    R(offloaded=False, devices=0),
    R(offloaded=False, devices=8, devices_available=4),
    R(offloaded=False, devices=4, devices_available=4, num_experts=2),
    mesh(policy="expertflow"),
    mesh(step="device", policy="predictive", predictor=True),
    mesh(step="device", policy="expertflow", hybrid=True),
    mesh(routing="cache-aware"),
    mesh(timing=True),
    mesh(timeline=True),
    mesh(auto_budget=True),
    mesh(transfers=True),
    mesh(host_memory="mapped"),
    mesh(host_compute="auto"),
    mesh(route_override=True),
    R(offloaded=False, expert_kernel="pallas", platform="cpu"),
    R(offloaded=False, expert_kernel="pallas", platform="gpu", expert_dims=(32, 24)),
]


def test_every_row_is_reached_and_renders_for_both_callers():
    assert len(REQUESTS) == len(ROWS)
    for row, req in zip(ROWS, REQUESTS):
        for flags in (None, {"record_timeline": "--timeline"}):
            found = problems(req, flags)
            assert found and found[0][0] == row.argument, (row.message, found)
            assert "<" not in found[0][1] and "{" not in found[0][1], found[0][1]
    assert problems(R(offloaded=True)) == [] and problems(R(offloaded=False)) == []
    assert "step='layer'" in problems(REQUESTS[10])[0][1] and "--step layer" in problems(REQUESTS[10], {})[0][1]


def test_device_policies_are_the_device_steps_kinds():
    from ef_jax.engine.programs import device_policies
    assert support.DEVICE_POLICIES == device_policies.KINDS


def test_host_only():
    """The CLI consults the table before importing jax."""
    import subprocess
    import sys
    code = "import sys, ef_jax.cache.support, ef_jax.cli.support; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


CONFIG_ROWS = [  # refused by OffloadConfig itself: no model needed
    (dict(policy="predictive"), "needs a predictor"),
    (dict(policy="belady"), "offline oracle"),
    (dict(step="device", policy=LRU()), "decides evictions on the host"),
    (dict(step="device", host_memory="mapped"), "copies inside its program"),
    (dict(step="device", timing="h100"), "charges each copy on the host"),
    (dict(step="device", transfers="thread"), "copies inside the step program"),
    (dict(step="device", layers_per_group=2), "runs every layer in one program"),
]


@pytest.mark.parametrize("kw,words", CONFIG_ROWS, ids=[w for _, w in CONFIG_ROWS])
def test_offload_config_refuses(kw, words):
    with pytest.raises(Unsupported, match=words):
        OffloadConfig(slots_per_layer=2, **kw)


def test_the_runs_next_to_them_are_accepted():
    OffloadConfig(slots_per_layer=2, policy=PolicySpec("predictive", predictor="online"))
    OffloadConfig(slots_per_layer=2, step="device", policy=PolicySpec("predictive", predictor="online"))
    OffloadConfig(slots_per_layer=2, step="device", record_timeline="t.json")  # one step per event (issue 26)
    OffloadConfig(slots_per_layer=2, transfers="thread", layers_per_group=2)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets XLA_FLAGS)")
    path = tiny_checkpoint("qwen3moe-norm")
    return ef_jax.load(path), ef_jax.load(path, mesh=ef_jax.expert_mesh(2))


SAME = lambda step, j, experts: experts  # noqa: E731
MODEL_ROWS = [  # refused by the Forward (so by generate, logits, evaluate_policy) before any program runs
    (False, None, dict(route_override=SAME), "a resident run reads none"),
    (False, dict(step="device"), dict(route_override=SAME), "routes inside the step program"),
    (False, dict(step="device"), dict(layers_per_group=2), "runs every layer in one program"),
    (True, dict(policy="expertflow"), {}, "runs on one device"),
    (True, dict(policy=LRU()), {}, "by name"),  # one object cannot be every device's policy
    (True, dict(step="device", policy=PolicySpec("predictive", predictor="online")), {}, "runs one cache per device"),
    (True, dict(step="device", policy=PolicySpec("expertflow", predictor=object())), {}, "on one device only"),
    (True, dict(routing="cache-aware"), {}, "reads one device's cache"),
    (True, dict(timing="h100"), {}, "models one copy stream"),
    (True, dict(record_timeline="t.json"), {}, "records one device's engine"),
    (True, dict(transfers="inline"), {}, "each device copies inline"),
    (True, dict(), dict(route_override=SAME), "not applied on a mesh"),
]


@pytest.mark.parametrize("on_mesh,kw,fwd_kw,words", MODEL_ROWS, ids=[c[-1] for c in MODEL_ROWS])
def test_forward_refuses(models, on_mesh, kw, fwd_kw, words):
    from ef_jax.engine.forward.forward import Forward
    model = models[on_mesh]
    offload = None if kw is None else OffloadConfig(slots_per_layer=2, **kw)
    with pytest.raises(Unsupported, match=words):
        Forward(model, offload, **fwd_kw)


def test_mesh_auto_budget_is_refused(models):
    with pytest.raises(Unsupported, match="reads one device's free memory"):
        ef_jax.generate(models[1], [[1, 2]], max_new_tokens=1, offload=OffloadConfig(expert_memory="auto"))


def test_batched_replay_refuses_an_oracle():
    from ef_jax.sim.batched import replay_steps
    with pytest.raises(Unsupported, match="fixed-width future"):
        replay_steps([[[0, 1]]], 1, num_layers=1, num_experts=4, slots_per_layer=2, policy="belady")


def test_no_moe_layers_row():
    with pytest.raises(Unsupported, match="no MoE layers"):
        support.check(Request.of(OffloadConfig(slots_per_layer=2), num_moe_layers=0))


def test_expert_kernel_rows():
    """pallas is refused off a GPU and for widths Triton cannot tile; pallas-interpret and xla run anywhere."""
    assert problems(R(offloaded=False, expert_kernel="pallas", platform="gpu", expert_dims=(2048, 1408))) == []
    assert problems(R(offloaded=True, expert_kernel="pallas-interpret", platform="cpu", expert_dims=(32, 24))) == []
    assert "--expert-kernel xla" in problems(R(offloaded=False, expert_kernel="pallas", platform="cpu"), {})[0][1]


def test_expert_kernel_is_checked_before_any_work(tiny_checkpoint):
    """An unknown kernel name is one ValueError from load, before the path is read; pallas on this CPU is refused
    by the Forward (so by generate) before any program runs."""
    import dataclasses
    with pytest.raises(ValueError, match="expert_kernel='triton' must be one of"):
        ef_jax.load("/nonexistent/checkpoint", expert_kernel="triton")
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"))
    with pytest.raises(ValueError, match="must be one of"):
        dataclasses.replace(model, expert_kernel="Pallas")
    if jax.default_backend() != "gpu":
        with pytest.raises(Unsupported, match="expert_kernel='pallas' lowers .* platform is cpu"):
            ef_jax.generate(dataclasses.replace(model, expert_kernel="pallas"), [[1, 2]], max_new_tokens=1)
