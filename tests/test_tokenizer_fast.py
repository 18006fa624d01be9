"""The tokenizer path imports no torch (tokenizer.json read by the `tokenizers` library) and gives what the
transformers tokenizer gives; the CLI's compilation cache goes where EF_JAX_CACHE_DIR says, unless the environment
already chose one, and --no-compile-cache turns it off."""
import os
import subprocess
import sys

import pytest

from ef_jax import compile_cache, tokenizer_fast
from ef_jax.model import DEFAULT_MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["To be, or not to be", "  spaces\tand\nlines ", "naïve café — 日本語", "<|endoftext|>after", ""]


def test_loading_the_default_tokenizer_imports_no_torch():
    code = ("import sys; from ef_jax.model import load_tokenizer, DEFAULT_MODEL_DIR; "
            "t = load_tokenizer(DEFAULT_MODEL_DIR); t.decode(t('hi')['input_ids']); "
            "print(type(t).__name__, 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["FastTokenizer", "False", "False"], out.stderr


def test_fast_tokenizer_equals_transformers():
    transformers = pytest.importorskip("transformers")
    fast = tokenizer_fast.FastTokenizer(DEFAULT_MODEL_DIR)
    ref = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    for text in TEXTS:
        for special in (True, False):
            ids = fast(text, add_special_tokens=special)["input_ids"]
            assert ids == ref(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            assert fast.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert fast.eos_token_id == ref.eos_token_id and fast.chat_template == ref.chat_template


def test_configs_tokenizer_json_cannot_express_go_to_transformers(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_fast.can_read_fast(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    assert not tokenizer_fast.can_read_fast(str(tmp_path))
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert not tokenizer_fast.can_read_fast(str(tmp_path))


@pytest.fixture
def no_jax_cache(monkeypatch):
    """jax's cache settings as a fresh CLI process has them (conftest.py set one for the run): restored after."""
    import jax
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield jax.config
    for n, v in saved.items():
        jax.config.update(n, v)


def test_compile_cache_goes_to_ef_jax_cache_dir(no_jax_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EF_JAX_CACHE_DIR", str(tmp_path / "ef"))
    assert compile_cache.enable() == str(tmp_path / "ef" / "jit") == no_jax_cache.jax_compilation_cache_dir
    assert os.path.isdir(tmp_path / "ef" / "jit")


def test_compile_cache_leaves_a_cache_the_environment_chose(no_jax_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EF_JAX_CACHE_DIR", str(tmp_path / "ef"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert compile_cache.enable() == str(tmp_path / "theirs")
    assert no_jax_cache.jax_compilation_cache_dir is None and not os.path.exists(tmp_path / "ef")


def test_no_compile_cache_flag_before_or_after_the_command():
    assert compile_cache.pop_flag(["generate", "--no-compile-cache", "hi"]) == (["generate", "hi"], True)
    assert compile_cache.pop_flag(["--no-compile-cache", "info"]) == (["info"], True)
    assert compile_cache.pop_flag(["info"]) == (["info"], False)
