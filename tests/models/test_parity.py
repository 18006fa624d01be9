"""The JAX model against Hugging Face transformers' PyTorch implementation, for every family and variant."""
import numpy as np
import pytest

import ef_jax
from tests.hf_models import V, VARIANTS, save_tiny

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

torch = pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    hf = save_tiny(request.param, d)
    return hf, ef_jax.load(d, dtype="float32")


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = np.random.RandomState(1).randint(0, V, (2, 13))
    ours = ef_jax.logits(model, ids)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.float().numpy()
    assert ours.shape == ref.shape == (2, 13, V)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_router_choices_match_transformers(pair):
    hf, model = pair
    ids = np.random.RandomState(2).randint(0, V, (1, 9))
    ours = ef_jax.trace_routing(model, ids.tolist())           # [T, L_moe, K]
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_router_logits=True)
    router_logits = [r for r in out.router_logits if r is not None]
    assert len(router_logits) == len(model.config.moe_layer_ids) == ours.shape[1]
    for j, rl in enumerate(router_logits):
        probs = torch.softmax(rl.float(), -1)
        cfg = model.config
        if cfg.topk_method == "group_limited_greedy":  # textbook: zero experts outside the best topk_group groups
            groups = probs.view(len(probs), cfg.n_group, -1)
            best = torch.topk(groups.max(-1).values, cfg.topk_group, dim=-1).indices
            keep = torch.zeros(len(probs), cfg.n_group, dtype=torch.bool).scatter_(1, best, True)
            probs = torch.where(keep[:, :, None], groups, 0.0).view(len(probs), -1)
        ref_top = torch.topk(probs, cfg.top_k, dim=-1).indices.numpy()
        assert [set(r) for r in ref_top] == [set(r) for r in ours[:, j]]


def test_greedy_batch_matches_transformers_alone(pair):
    hf, model = pair
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=16)
    for prompt, ours in zip(PROMPTS, res.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()
    assert all(len(t) == 16 for t in res.tokens)  # these configs have no EOS
    assert res.stats["prefill_s"] > 0 and res.stats["tokens_per_s"] > 0


def test_decode_with_cache_equals_full_forward(pair):
    """Logits of each decoded step (KV cache) equal a full forward pass over prompt + generated tokens."""
    _, model = pair
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.models.transformer import head, init_cache
    prompt = PROMPTS[0]
    seq = prompt + [11, 45, 7, 90]
    full = ef_jax.logits(model, [seq])[0]
    fwd = Forward(model, layers_per_group=2)
    S = len(seq) + 3
    cache = init_cache(model.config, 1, S, np.float32)
    valid = np.zeros((1, S), bool)
    valid[:, :len(prompt)] = True
    x, cache, _ = fwd(np.array([prompt]), np.arange(len(prompt))[None], 0, valid, cache)
    step_logits = [np.asarray(head(model.config, model.params, x, last_only=True))[0]]
    for t in range(len(prompt), len(seq)):
        valid[:, t] = True
        x, cache, _ = fwd(np.array([[seq[t]]]), np.array([[t]]), t, valid, cache)
        step_logits.append(np.asarray(head(model.config, model.params, x, last_only=True))[0])
    np.testing.assert_allclose(np.stack(step_logits), full[len(prompt) - 1:], atol=1e-4, rtol=0)


def test_layer_grouping_does_not_change_logits(pair):
    _, model = pair
    ids = np.random.RandomState(3).randint(0, V, (2, 6))
    ref = ef_jax.logits(model, ids, layers_per_group=1)
    for g in (2, 8):
        np.testing.assert_allclose(ef_jax.logits(model, ids, layers_per_group=g), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layers_per_group"):
        ef_jax.logits(model, ids, layers_per_group=0)
