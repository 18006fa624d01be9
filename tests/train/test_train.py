"""Building a default model end to end on a tiny offline corpus: tokenizer → a few training steps → export →
both ef_jax and transformers load the directory and agree; the loss goes down; the step count and the export
are reproducible for a seed."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("tokenizers")

import ef_jax
from ef_jax.train.config import TrainConfig
from ef_jax.train.corpus import DOMAINS, _held_out
from ef_jax.train.data import encode_stream, sample_batch
from ef_jax.train.fit import fit
from ef_jax.train.tokenizer import train_tokenizer

TINY = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
            top_k=2, moe_intermediate=16, seq_len=32, batch_size=4, steps=30, eval_every=10, warmup_steps=5,
            lr=1e-2, max_minutes=5.0)
TEXTS = {"shakespeare": ["To be, or not to be, that is the question.", "O Romeo, Romeo, wherefore art thou Romeo?"],
         "kjv": ["1 In the beginning God created the heaven and the earth.", "2 And the earth was without form."],
         "python": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    tok = train_tokenizer([t for ts in TEXTS.values() for t in ts] * 20, 300)
    tok.save_pretrained(os.path.join(d, "tokenizer"))
    streams = {}
    for dom in DOMAINS:
        streams[f"{dom}_train"] = encode_stream(tok, TEXTS[dom] * 30)
        streams[f"{dom}_heldout"] = encode_stream(tok, TEXTS[dom][::-1] * 10)
    np.savez(os.path.join(d, "streams.npz"), **streams)
    json.dump({"domains": {}}, open(os.path.join(d, "corpus.json"), "w"))
    return d


def test_tokenizer_round_trips_bytes(data_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    for s in ["To be, or not", "def f(x):\n\treturn x  # ü ☃", "  spaces\n\n"]:
        assert tok.decode(tok(s, add_special_tokens=False).input_ids) == s
    assert tok.eos_token == "<|endoftext|>"


def test_sampler_is_a_pure_function_of_seed_and_step():
    streams = [np.arange(1000, dtype=np.uint16), np.arange(5000, 6000, dtype=np.uint16)]
    a = sample_batch(streams, 8, 16, seed=3, step=7)
    assert a.shape == (8, 17) and (a == sample_batch(streams, 8, 16, seed=3, step=7)).all()
    assert not (a == sample_batch(streams, 8, 16, seed=3, step=8)).all()
    assert (np.diff(a, axis=1) == 1).all()  # contiguous windows


def test_heldout_split_is_stable():
    names = [f"doc{i}" for i in range(200)]
    held = {n for n in names if _held_out(n, 20)}
    assert 3 <= len(held) <= 25                                    # about 1 in 20
    assert held & set(names[:50]) == {n for n in names[:50] if _held_out(n, 20)}  # a name's fate ignores the rest


def test_fit_exports_a_checkpoint_both_libraries_load(data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    out = str(tmp_path / "model")
    summary = fit(TrainConfig(**TINY), data_dir, out, export_dtype="float32")
    first, last = summary["log"][0], summary["log"][-1]
    assert last["ce"] < first["ce"] - 0.5, summary["log"]  # it learns the tiny corpus
    assert summary["steps_done"] == 30 and summary["exported_step"] in (1, 10, 20, 30)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "training_config.json", "training_log.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    model = ef_jax.load(out, dtype="float32")
    assert model.config.family == "qwen3_moe" and model.config.num_experts == 4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.array([[3, 50, 7, 100, 21, 9]])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ef_jax.logits(model, ids), ref, atol=1e-4, rtol=0)
    # the same seed exports the same weights
    out2 = str(tmp_path / "model2")
    fit(TrainConfig(**TINY), data_dir, out2, export_dtype="float32")
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == \
        open(os.path.join(out2, "model.safetensors"), "rb").read()


def test_export_failure_leaves_nothing(tmp_path):
    from ef_jax.train.export import export_checkpoint
    from ef_jax.train.objective import init_params, model_config
    tc = TrainConfig(**TINY)
    cfg = model_config(tc, 0)
    params, experts = init_params(cfg, 0)

    class BrokenTokenizer:
        def save_pretrained(self, d):
            raise OSError("disk full")

    out = tmp_path / "m"
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(str(out), cfg, {"eos_token_id": 0, "bos_token_id": 0}, params, experts, BrokenTokenizer())
    assert not out.exists() and os.listdir(tmp_path) == []
