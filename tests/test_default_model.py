"""The shipped default model: transformers loads it and agrees with ef_jax, it writes recognisable text, its
model card and held-out routing traces ship with it, and the training code reproduces ef_jax's forward pass."""
import os
import re

import numpy as np
import pytest

import ef_jax
from ef_jax import cli
from ef_jax.model import DEFAULT_MODEL_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")),
                                reason="the default model is not shipped in this build")
ENGLISH = {"the", "and", "to", "of", "i", "a", "my", "be", "not", "is", "that", "you", "in", "me", "it", "so",
           "as", "with", "for", "his", "he", "him", "thou", "thy", "will", "but", "this", "what", "your", "have"}


@pytest.fixture(scope="module")
def model():
    return ef_jax.load(dtype="float32")


def test_transformers_logits_match(model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tok(["To be, or not to be, that is the question:\nWhether 'tis nobler"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    ours = ef_jax.logits(model, ids.numpy())
    assert ours.shape == ref.shape == (1, ids.shape[1], model.config.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_cli_generate_english(capsys):
    assert cli.main(["generate", "To be, or not", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    words = _words(out)
    assert len(words) >= 15, out
    assert sum(w in ENGLISH for w in words) / len(words) > 0.3, out


def test_cli_generate_code(capsys):
    assert cli.main(["generate", "def ", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\w+\(", out) and (":" in out or "=" in out), out  # a call/def and Python punctuation


def test_model_card_states_the_required_facts():
    card = open(os.path.join(DEFAULT_MODEL_DIR, "README.md")).read()
    for needle in ("CC-BY 2.5", "MIT", "PSF", "Byte-level BPE", "Qwen3MoeForCausalLM", "routed experts",
                   "held-out perplexity", "entropy", "reuse", "pre-gate recall", "minutes on"):
        assert needle in card, needle


def test_shipped_traces_match_the_model(model):
    from ef_jax.trace import load_trace
    for dom in ("shakespeare", "kjv", "python"):
        path = os.path.join(REPO, "benchmarks", "data", f"default_model_{dom}.npz")
        trace = load_trace(path)
        assert trace.experts.shape[1:] == (model.config.num_moe_layers, model.config.top_k)
        assert trace.num_tokens >= 2048
        # re-trace the first sequence from its token strings: the same experts (as sets) at every layer
        first = trace.prompt(0)
        ids = model.tokenizer.convert_tokens_to_ids(trace.token_strings()[:len(first)])
        again = ef_jax.trace_routing(model, [ids])
        assert (np.sort(again, -1) == np.sort(first.astype(np.int64), -1)).mean() > 0.999


def test_training_forward_equals_inference(model):
    """The training objective's forward (dense-masked experts) is ef_jax's inference forward."""
    import jax.numpy as jnp

    from ef_jax.train.objective import forward
    experts = tuple({k: jnp.asarray(v) for k, v in model.experts.layer(j).items()}
                    for j in range(model.experts.num_layers))
    tokens = np.array([[5, 17, 300, 42, 9, 1000, 7, 3]], np.int32)
    logits, _ = forward(model.config, model.params, experts, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), ef_jax.logits(model, tokens), atol=2e-4, rtol=0)
