"""Shared pytest setup: GPU marker handling, tiny Hugging Face checkpoints built once per session."""
import jax
import pytest


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
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
