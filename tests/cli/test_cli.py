"""`ef-jax info` and `ef-jax generate` on a tiny checkpoint, and a clear error for a bad path."""
import pytest

from ef_jax import cli
from tests.hf_models import save_tiny

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("deepseek"))
    save_tiny("deepseek-qlora-none", d)
    return d


def test_info(tiny_dir, capsys):
    assert cli.main(["info", tiny_dir]) == 0
    out = capsys.readouterr().out
    assert "DeepseekV2ForCausalLM" in out
    assert "per expert 6.0 KiB" in out          # 3 × 32 × 16 float32
    assert "2 MoE" in out and "in routed experts" in out


def test_generate_with_token_prompt(tiny_dir, capsys):
    # No tokenizer in a tiny checkpoint: the prompt is text, so generate must say how to fix it.
    assert cli.main(["generate", "--model", tiny_dir, "hello"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_bad_model_path(capsys, tmp_path):
    assert cli.main(["info", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _save_word_tokenizer(directory: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}, }
    vocab.update({"hello": 1, "world": 2})
    vocab = {w: i for w, i in vocab.items() if not (w in ("w1", "w2"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def test_generate_text_prompt_prints_text_and_stats(tiny_dir, capsys, tmp_path):
    import shutil
    d = str(tmp_path / "with_tok")
    shutil.copytree(tiny_dir, d)
    _save_word_tokenizer(d, 96)
    assert cli.main(["generate", "--model", d, "--max-new-tokens", "5", "hello world"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello world") and len(out.split()) == 2 + 5
    assert "5 tokens" in err and "tokens/s" in err and " ms " in err


def test_generate_offloaded_prints_expert_stats(tiny_dir, capsys, tmp_path):
    import json
    import shutil
    d = str(tmp_path / "with_tok")
    shutil.copytree(tiny_dir, d)
    _save_word_tokenizer(d, 96)
    timeline = str(tmp_path / "t.json")
    assert cli.main(["generate", "--model", d, "--max-new-tokens", "4", "--expert-memory", "36KiB",
                     "--policy", "lru", "--timeline", timeline, "hello world"]) == 0
    err = capsys.readouterr().err
    assert "hit rate" in err and "H2D" in err and "resident 36.0 KiB" in err  # 2 MoE layers × 3 slots × 6 KiB
    assert json.load(open(timeline))["traceEvents"]


def test_trace_writes_the_shared_npz_layout(tiny_dir, tmp_path):
    import shutil
    import numpy as np
    from ef_jax.trace import load_trace
    d = str(tmp_path / "with_tok")
    shutil.copytree(tiny_dir, d)
    _save_word_tokenizer(d, 96)
    text = tmp_path / "t.txt"
    text.write_text("hello world w3 w4 w5\n\nw6 w7 hello\n")
    out = str(tmp_path / "trace.npz")
    assert cli.main(["trace", "--model", d, "--text", str(text), "--out", out, "--split-paragraphs"]) == 0
    z = np.load(out)
    assert z["experts"].dtype == np.uint8 and z["experts"].shape == (8, 2, 2)   # 8 tokens × 2 MoE layers × top-2
    assert z["offsets"].tolist() == [0, 5, 8]
    assert bytes(z["tokens"]).split(b"\0")[:-1][:2] == [b"hello", b"world"]
    assert load_trace(out).experts.shape == (8, 2, 2)


def test_info_reads_headers_only(tiny_dir, capsys, monkeypatch):
    """Issue 24: info needs config.json and the safetensors headers, never a weight (nor ef_jax.load)."""
    import ef_jax
    from ef_jax import host_experts
    monkeypatch.setattr(ef_jax, "load", lambda *a, **k: pytest.fail("info loaded the model"))
    monkeypatch.setattr(host_experts.TensorRef, "read", lambda *a, **k: pytest.fail("info read a weight"))
    assert cli.main(["info", tiny_dir, "--dtype", "float32", "--expert-memory", "36KiB"]) == 0
    out = capsys.readouterr().out
    assert "on disk" in out and "(F32)" in out
    assert "--expert-memory 36KiB = 3 slot(s) per MoE layer" in out   # 2 MoE layers × 6 KiB experts
    assert "host memory  pinned: " in out and "mapped: 0 pinned" in out
