"""Hub ids (`org/name[@rev]`) as model paths, from a Hugging Face cache built in the test (no network): load,
generate, info and serve resolve them offline; each failure (not cached, .bin only, gated, no network) is one line,
exit 2, before any weight is read."""
import os
import time

import pytest

import ef_jax
from ef_jax import cli, hub
from ef_jax.model import DEFAULT_MODEL_DIR

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache(root, repo="org/tiny", files=None) -> str:
    """The HF cache layout: models--org--name/{refs/main, snapshots/<rev>/...} (files as symlinks, as the Hub's)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    for f in files or os.listdir(DEFAULT_MODEL_DIR):
        src = os.path.join(DEFAULT_MODEL_DIR, f)
        if os.path.exists(src):
            os.symlink(src, snap / f)
        else:
            (snap / f).write_bytes(b"")
    return str(snap)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a command reads weights: refusals come before any work."""
    def boom(*a, **k):
        raise AssertionError("ef_jax.load ran")
    monkeypatch.setattr(ef_jax, "load", boom)


def test_hub_id_loads_offline_from_the_cache(hf_cache):
    snap = _cache(hf_cache)
    assert hub.resolve("org/tiny") == snap and hub.resolve(f"org/tiny@{REV}") == snap
    assert hub.resolve(DEFAULT_MODEL_DIR) == DEFAULT_MODEL_DIR and hub.resolve(None) is None
    m = ef_jax.load("org/tiny")
    assert m.path == snap and m.config == ef_jax.load().config and m.tokenizer is not None


def test_generate_and_info_take_a_hub_id(hf_cache, capsys):
    snap = _cache(hf_cache)
    assert cli.main(["info", "org/tiny"]) == 0
    assert snap in capsys.readouterr().out
    assert cli.main(["generate", "--model", "org/tiny", "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 0


def test_serve_takes_a_hub_id(hf_cache, monkeypatch):
    _cache(hf_cache)
    uvicorn = pytest.importorskip("uvicorn")
    seen = {}

    def run(self):  # instead of listening: wait until the loader thread made the app (LoadingApp.ready)
        deadline = time.time() + 120
        while self.config.app.app is None:
            assert time.time() < deadline
            time.sleep(0.05)
        seen.update(app=self.config.app.app)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert cli.main(["serve", "--model", "org/tiny", "--port", "1"]) == 0
    assert any(getattr(r, "path", "") == "/v1/models" for r in seen["app"].routes)


@pytest.mark.parametrize("files,cmd,says", [
    (None, ["info", "org/other"], "HF_HUB_OFFLINE"),                                   # not in the cache
    (["config.json", "pytorch_model.bin"], ["info", "org/tiny"], ".bin"),              # only .bin weights
    (None, ["generate", "--model", "org/tiny@v9", "hi"], "not in the Hugging Face cache"),  # unknown revision
    (None, ["serve", "--model", "org/other"], "HF_HUB_OFFLINE"),
])
def test_offline_failures_are_one_line_and_exit_2(hf_cache, no_load, capsys, files, cmd, says):
    _cache(hf_cache, files=files)
    assert cli.main(cmd) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def _http_error(cls, status):
    import httpx2
    return cls("denied", response=httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co")))


@pytest.mark.parametrize("raise_, says", [
    (lambda: _http_error(__import__("huggingface_hub").errors.GatedRepoError, 401), "HF_TOKEN"),
    (lambda: _http_error(__import__("huggingface_hub").errors.RepositoryNotFoundError, 404), "not a model on"),
    (lambda: ConnectionError("Name or service not known"), "HF_HUB_OFFLINE=1"),
])
def test_online_failures_name_the_fix(tmp_path, monkeypatch, no_load, capsys, raise_, says):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def model_info(self, *a, **k):
        raise raise_()
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert cli.main(["generate", "--model", "org/gated", "hi"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_online_bin_only_repo_is_refused_before_download(tmp_path, monkeypatch):
    import types

    import huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    info = types.SimpleNamespace(sha=REV, siblings=[types.SimpleNamespace(rfilename=f)
                                                    for f in ("config.json", "pytorch_model.bin")])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(hub.HubError, match=r"only PyTorch \.bin"):
        ef_jax.load("org/binonly")
