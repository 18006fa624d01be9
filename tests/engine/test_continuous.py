"""engine.continuous: rows join a running pool, skip steps, leave, get repacked — and every request still decodes
the tokens it decodes alone with ef_jax.generate (greedy and seeded sampling, resident and offloaded)."""
import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.engine.loop.continuous import RowPool, expert_sets, repack_index, resident_experts
from ef_jax.engine.forward.forward import Forward
from ef_jax.engine.loop.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2], [88, 3, 60, 12, 7, 7, 1], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54,
                                                        55, 56, 57], [60, 2, 2]]


def _drive(pool: RowPool, prompts, max_new, sps, seeds, *, joins_at, pick):
    """A minimal driver: prompt i joins at step joins_at[i] (or when a row frees up); `pick(step, live)` chooses
    the rows that step. Returns the generated tokens per prompt."""
    out = [[] for _ in prompts]
    row_of, pending = {}, list(range(len(prompts)))
    step = 0
    while pending or row_of:
        for i in list(pending):
            if joins_at[i] <= step and pool.free_rows():
                r, logits, _ = pool.join(prompts[i], max_new)
                out[i].append(int(pool.sample(logits, [0], [sps[i]], [seeds[i]], [0])[0]))
                row_of[i] = r
                pending.remove(i)
        for i in [i for i in row_of if len(out[i]) == max_new]:
            pool.free(row_of.pop(i))
        if not row_of:
            step += 1
            continue
        live = sorted(row_of)
        chosen = pick(step, live)
        tokens = np.zeros(pool.R, np.int32)
        positions = np.zeros(pool.R, np.int32)
        for i in live:
            tokens[row_of[i]] = out[i][-1]
            positions[row_of[i]] = len(prompts[i]) + len(out[i]) - 1
        logits, _ = pool.step([row_of[i] for i in chosen], tokens, positions)
        toks = pool.sample(logits, [row_of[i] for i in chosen], [sps[i] for i in chosen], [seeds[i] for i in chosen],
                           [len(out[i]) for i in chosen])
        for i, t in zip(chosen, toks):
            out[i].append(int(t))
        step += 1
    return out


def _alone(model, prompts, max_new, sps, seeds, offload=None):
    return [ef_jax.generate(model, [p], max_new_tokens=max_new, temperature=sp.temperature, top_k=sp.top_k,
                            top_p=sp.top_p, seed=s, offload=offload).tokens[0]
            for p, sp, s in zip(prompts, sps, seeds)]


def test_repack_index_squeezes_holes_and_right_aligns():
    valid = np.array([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1]], bool)
    index, new = repack_index(valid, 4)
    assert new.tolist() == [[0, 1, 1, 1, 0, 0], [0] * 6, [0, 1, 1, 1, 0, 0]]
    assert index[0, 1:4].tolist() == [1, 3, 4] and index[2, 1:4].tolist() == [0, 1, 5]
    with pytest.raises(RuntimeError, match="row 0 holds 3"):
        repack_index(valid, 2)


def test_expert_sets_one_hot():
    s = expert_sets(np.array([[[0, 2], [1, 3]]]), 4)
    assert s.tolist() == [[1, 0, 1, 0, 0, 1, 0, 1]]


@pytest.mark.parametrize("name", ["mixtral-top2", "mixtral-top1-window", "deepseek-qlora-none"])
def test_staggered_joins_skips_and_repacks_keep_each_requests_tokens(tiny_checkpoint, name):
    """Rows join at different steps, a round-robin skips some each step (holes), the cache is small enough that
    the write slot wraps (repacks), a freed row is reused — greedy and seeded sampling match generate alone."""
    model = ef_jax.load(tiny_checkpoint(name))
    greedy, hot = SamplingParams(), SamplingParams(temperature=0.8, top_k=20)
    sps = [greedy, hot, greedy, greedy, hot]
    seeds = [0, 3, 0, 0, 11]
    max_new = 6
    with Forward(model) as fwd:
        pool = RowPool(fwd, 3, 32)  # 3 rows for 5 prompts: the last ones wait for a free row
        out = _drive(pool, PROMPTS, max_new, sps, seeds, joins_at=[0, 0, 2, 3, 3],
                     pick=lambda step, live: live[step % 2::2] or live)
        assert pool.repacks >= 1
    assert out == _alone(model, PROMPTS, max_new, sps, seeds)


def test_offloaded_pool_matches_offloaded_alone_and_reports_residency(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"))
    off = OffloadConfig(slots_per_layer=3)
    sps, seeds = [SamplingParams()] * 4, [0] * 4
    with Forward(model, off) as fwd:
        pool = RowPool(fwd, 4, 48)
        out = _drive(pool, PROMPTS[:4], 5, sps, seeds, joins_at=[0, 1, 1, 2], pick=lambda step, live: live)
        res = resident_experts(fwd)
        assert res.shape == (len(model.config.moe_layer_ids) * model.config.num_experts,)
        assert res.reshape(len(model.config.moe_layer_ids), -1).sum(1).max() <= 3
        assert fwd.stats()["misses"] > 0
    assert out == _alone(model, PROMPTS[:4], 5, sps, seeds, off)


def test_last_routes_are_the_prefills_routing(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("mixtral-top2"))
    with Forward(model) as fwd:
        pool = RowPool(fwd, 2, 32)
        _, _, routings = pool.join(PROMPTS[1], 4)
        last = pool.last_routes(routings, 1)
    experts = ef_jax.trace_routing(model, [PROMPTS[1]])   # [T, L, K]
    assert last.shape == (1, len(model.config.moe_layer_ids), 2)
    assert sorted(last[0, 0].tolist()) == sorted(experts[-1, 0].tolist())


def test_pool_rejects_what_does_not_fit(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("mixtral-top2"))
    with Forward(model) as fwd:
        pool = RowPool(fwd, 1, 16)
        with pytest.raises(ValueError, match="must fit"):
            pool.join(list(range(12)), 5)
        pool.join([1, 2], 3)
        with pytest.raises(RuntimeError, match="every pool row is live"):
            pool.join([1, 2], 3)
        pool.free(0)
        with pytest.raises(RuntimeError, match="not live"):
            pool.free(0)
