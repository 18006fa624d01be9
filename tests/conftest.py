"""Shared pytest setup: four host devices, quick CPU compiles, a persistent compilation cache for the run, GPU marker
handling, tiny Hugging Face checkpoints built once per session."""
import os
import tempfile

# Quantized experts are cached at load (ef_jax.quant.cache): the suite writes its entries to a directory of its own,
# never the user's ~/.cache/ef_jax (xdist workers and subprocesses inherit it).
os.environ.setdefault("EF_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="ef_jax-test-cache-"))
# Four CPU devices for the expert-parallel tests (tests/test_mesh.py); set before jax starts, here and (through the
# environment) in every subprocess. Single-device code runs on the first of them, as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# Quick CPU compiles: the suite compiles thousands of tiny programs (every family, policy, copier and load bucket)
# and runs each a few steps, so XLA's CPU compile time is most of its time. LLVM at -O0 and the classic (non-fusion)
# emitters compile the same programs about 4× faster (an offloaded generate of the shipped model: ~46 → ~11 CPU s);
# the programs run slower, which tiny shapes hardly notice. What the engine does is the same, and every comparison
# (offloaded vs resident tokens) is between runs made under the same flags. EF_JAX_TEST_XLA_DEFAULTS=1 keeps XLA's
# own settings (the release compiler); flags already in XLA_FLAGS win. Subprocesses inherit them.
# XLA aborts a process on a flag it does not know, so a jaxlib that dropped one of these would stop every test:
# the first process tries them in a child interpreter and keeps them only if it starts (the result travels to
# xdist workers and subprocesses in EF_JAX_TEST_QUICK_FLAGS).
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _quick_flags_work(flags: str) -> bool:
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=300).returncode == 0


if os.environ.get("EF_JAX_TEST_XLA_DEFAULTS", "") in ("", "0"):
    _new = [f for f in QUICK_COMPILE_FLAGS if f.split("=")[0] not in os.environ["XLA_FLAGS"]]
    if _new and "EF_JAX_TEST_QUICK_FLAGS" not in os.environ:
        _quick = " ".join([os.environ["XLA_FLAGS"], *_new])
        os.environ["EF_JAX_TEST_QUICK_FLAGS"] = "1" if _quick_flags_work(_quick) else "0"
    if _new and os.environ["EF_JAX_TEST_QUICK_FLAGS"] == "1":
        os.environ["XLA_FLAGS"] = " ".join([os.environ["XLA_FLAGS"], *_new])

import jax  # noqa: E402
import pytest


def pytest_configure(config):
    """One on-disk XLA compilation cache for the whole run (every xdist worker and every CLI/server subprocess the
    tests start): the suite compiles the same tiny programs in many modules and processes, and compiling, not
    running, is most of its time on a CPU. A fresh directory per run unless EF_JAX_TEST_JIT_CACHE names one, so a
    run never depends on what an earlier one left."""
    path = os.environ.get("EF_JAX_TEST_JIT_CACHE")
    if not path:
        run = getattr(config, "workerinput", {}).get("testrunuid") or f"{os.getpid()}"
        path = os.path.join(tempfile.gettempdir(), f"ef_jax_test_jit_{run}")
        os.environ["EF_JAX_TEST_JIT_CACHE"] = path
        config._ef_jax_owned_cache = path  # this process made it: removed when the run ends
    os.makedirs(path, exist_ok=True)
    settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # subprocesses (ef-jax generate/serve) read the same cache


def pytest_unconfigure(config):
    path = getattr(config, "_ef_jax_owned_cache", None)
    if path:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    # Tests marked slow (whole modules, so a module's fixtures are still built once per worker) run first: with
    # `-n 2` a long test started last would leave one worker idle while it finishes.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name → the directory of that tiny Hugging Face checkpoint (tests/hf_models.py). Each variant is built once
    per session and shared by every module that asks for it: callers only read it (ef_jax.load, --model)."""
    pytest.importorskip("torch")
    from tests.hf_models import save_tiny
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            d = str(tmp_path_factory.mktemp(name))
            save_tiny(name, d)
            built[name] = d
        return built[name]
    return get


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches():
    """Each test module starts with empty jit caches: the suite compiles thousands of programs (every copier,
    policy, family and load bucket), and holding all their executables in one process is what a long CPU run
    should not depend on."""
    yield
    import gc
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def random_hybrid():
    """(model, point) → a hybrid head (ef_jax.hybrid.HybridPredictor) on the model's routers with random non-zero
    parameters, every pair distance the model has: what the device step's head must equal the host's on."""
    def make(model, point: str, seed: int = 0):
        import numpy as np
        from ef_jax.engine.sources.context import policy_context
        from ef_jax.hybrid import model as hm
        from ef_jax.hybrid.predictor import HybridPredictor
        cfg, ctx = model.config, policy_context(model)
        L = len(cfg.moe_layer_ids)
        hc = hm.HybridConfig(num_layers=L, num_experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.hidden_size,
                             vocab=cfg.vocab_size, max_distance=L - 1, token_dim=8, eps=cfg.rms_norm_eps,
                             point=point)
        rng = np.random.default_rng(seed)
        params = {k: rng.normal(0, 0.5, np.shape(v)).astype(np.float32) for k, v in hm.init_params(hc).items()}
        return HybridPredictor(hc, params, ctx.routers, ctx.norms)
    return make
