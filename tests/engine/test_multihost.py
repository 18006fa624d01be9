"""Several hosts: two processes on 127.0.0.1 joined by jax.distributed (CPU collectives: gloo), one CPU device each,
decode a tiny checkpoint on a mesh that spans them, and produce one device's tokens, resident and offloaded. A tiny
Qwen3-MoE checkpoint (3 MoE layers, 8 experts: 4 per process), not the shipped model: each of the three processes
compiles its own programs, and the shipped model's (10 layers × 32 experts) cost minutes on a 2-core CI machine;
the shipped model on a one-process mesh is tests/test_mesh.py's."""
import json
import os
import socket
import subprocess
import sys

import jax
import pytest

import ef_jax
from tests.engine.multihost_worker import NEW, PROMPTS

CHECKPOINT = "qwen3moe-norm"

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.slow  # one of the longest modules: scheduled first (tests/conftest.py)


def test_two_processes_decode_one_devices_tokens(tmp_path, tiny_checkpoint):
    try:
        jax.config.jax_cpu_collectives_implementation  # noqa: B018 — absent in jax builds without CPU collectives
    except AttributeError:
        pytest.skip("this jax has no CPU collectives (jax_cpu_collectives_implementation)")
    env = dict(os.environ)  # one CPU device per process; the quick-compile flags stay (tests/conftest.py)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), env.get("PYTHONPATH", "")])
    ckpt = tiny_checkpoint(CHECKPOINT)
    port = _free_port()
    outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    worker = os.path.join(HERE, "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), outs[i], ckpt], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ref = ef_jax.generate(ef_jax.load(ckpt), PROMPTS, max_new_tokens=NEW).tokens
    got = [json.load(open(o)) for o in outs]
    for g in got:
        assert g["resident"] == ref and g["offloaded"] == ref
    # both processes ran both devices' caches on the same routing: the same counts in each (stall is measured by
    # the device's own process only)
    counts = [[(d["hits"], d["misses"], d["h2d_bytes"]) for d in g["per_device"]] for g in got]
    assert counts[0] == counts[1] and len(counts[0]) == 2 and all(h + m > 0 for h, m, _ in counts[0])
