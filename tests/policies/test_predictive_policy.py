"""The predictive policy: simulator cases with known answers, the real trace against LRU, and offloaded decoding
through the engine (tokens equal to resident decoding, fewer demand loads than LRU with a good predictor)."""
from pathlib import Path

import numpy as np
import pytest

from ef_jax.cache import ExpertCache
from ef_jax.policies import get_policy
from ef_jax.policies.registry import PolicySpec
from ef_jax.policies.predictive import Predictive
from ef_jax.sim import replay

TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "deepseek-v2-lite-puffin-dev.npz"


def random_route(N=40, L=3, K=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(N)]).astype(np.uint8)


def one_hot(experts, E):
    out = np.zeros(experts.shape[:2] + (E,), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


def test_perfect_predictions_hit_everything_and_wrong_ones_are_corrected_on_demand():
    x = random_route()
    perfect = Predictive(scores=one_hot(x, 8), top_k=2)
    s = replay(x, slots_per_layer=3, policy=perfect, num_experts=8, check=True)
    assert s.hit_rate == 1.0 and s.demand_loads == 0 and perfect.precision == 1.0
    wrong = one_hot((x + 4) % 8, 8)                  # never the right experts
    s = replay(x, slots_per_layer=4, policy=Predictive(scores=wrong, top_k=2), num_experts=8, check=True)
    assert s.hits + s.misses == x.size and s.demand_loads == s.misses > 0
    lru = replay(x, slots_per_layer=3, policy="lru", num_experts=8)
    assert lru.misses > 0


def test_victim_is_an_unpredicted_expert_before_lru():
    scores = np.zeros((3, 1, 6), np.float32)
    scores[2, 0, [0, 5]] = 1                       # step 2 predicts experts 0 and 5
    pol = Predictive(scores=scores, prefetch=2, horizon=1)
    cache = ExpertCache(1, 6, 3, pol)
    for step_experts in ([0, 1], [2]):             # residents 0, 1, 2; 0 is least recent
        cache.begin_step()
        cache.route(0, step_experts)
        cache.release(0)
        cache.end_step()
    loads = cache.begin_step()                     # step 2: prefetch 5, evicting 1 (unpredicted, LRU) — not 0
    assert [(ld.expert, ld.evicted) for ld in loads] == [(5, 1)]


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of predictor"):
        Predictive()
    with pytest.raises(ValueError, match="exactly one of predictor"):
        Predictive(predictor=object(), scores=np.zeros((1, 1, 4)))
    from ef_jax.policies.step_predictor import OnlineLookupPredictor
    assert isinstance(get_policy("predictive").predictor, OnlineLookupPredictor)   # by name: an online lookup
    with pytest.raises(ValueError, match=r"scores have \[L, E\]"):
        ExpertCache(2, 8, 3, Predictive(scores=np.zeros((4, 3, 8))))


@pytest.mark.skipif(not TRACE.exists(), reason="needs ../shared/data/routing (not shipped with the package)")
def test_fewer_misses_than_lru_on_the_real_trace():
    from ef_jax.predict import TokenLookupBaseline
    from ef_jax.predict.train import prompt_slice
    from ef_jax.trace import load_trace
    full = load_trace(TRACE)
    train, val = prompt_slice(full, 0, 800), prompt_slice(full, 800, 815)
    scores = TokenLookupBaseline(64).fit(train).scores(val)
    kw = dict(slots_per_layer=16, num_experts=64, timing="h100")
    lru = replay(val.experts, policy="lru", **kw)
    pred = replay(val.experts, policy=Predictive(scores=scores, top_k=6), **kw)
    assert pred.misses < 0.9 * lru.misses, (pred.hit_rate, lru.hit_rate)


# ---- engine ---------------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12]]


@pytest.fixture(scope="module", params=["mixtral-top2"])  # one family: the engine's parity suite covers the rest
def model(request, tiny_checkpoint):
    import ef_jax
    return ef_jax.load(tiny_checkpoint(request.param))


class _Oracle:
    """A StepPredictor that knows each step's routing (recorded from an earlier run of the same decode)."""

    def __init__(self, routing_log, num_experts):
        self.log, self.E = routing_log, num_experts

    def reset(self, num_layers, num_experts):
        self.step = 0

    def predict(self, token_ids):
        route = self.log[self.step]                 # [rows, L, K]
        self.step += 1
        out = np.zeros((1, route.shape[1], self.E), np.float32)
        for l in range(route.shape[1]):
            out[0, l, np.unique(route[:, l])] = 1
        return out

    def observe(self, layer, experts):
        pass


def test_engine_tokens_equal_resident_and_an_oracle_beats_lru(model):
    import ef_jax
    from ef_jax import OffloadConfig
    from ef_jax.engine.loop.batch import make_batch
    from ef_jax.engine.loop.decode import sample_rows
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.engine.forward.forward import Forward
    cfg = model.config
    S = cfg.top_k
    ref = ef_jax.generate(model, PROMPTS[:1], max_new_tokens=8).tokens
    lru = ef_jax.generate(model, PROMPTS[:1], max_new_tokens=8, offload=OffloadConfig(slots_per_layer=S, policy="lru"))
    online = ef_jax.generate(model, PROMPTS[:1], max_new_tokens=8,
                             offload=OffloadConfig(slots_per_layer=S, policy=PolicySpec("predictive", predictor="online"),
                                                   check=True))
    assert online.tokens == lru.tokens == ref and online.stats["policy"] == "predictive"
    fwd = Forward(model, OffloadConfig(slots_per_layer=S, policy="lru"))
    sample_rows(fwd, make_batch(PROMPTS[:1], 8), SamplingParams(), 0, set(), 8)
    oracle = Predictive(_Oracle(fwd.source.routing_log, cfg.num_experts), prefetch=cfg.num_experts, threshold=0.5,
                        top_k=cfg.top_k)
    res = ef_jax.generate(model, PROMPTS[:1], max_new_tokens=8,
                          offload=OffloadConfig(slots_per_layer=S, policy=oracle, check=True))
    assert res.tokens == ref
    assert res.stats["cache_demand_loads"] < lru.stats["cache_demand_loads"]


def test_engine_with_a_path_predictor_in_a_batch(model):
    import jax

    import ef_jax
    from ef_jax import OffloadConfig
    from ef_jax.predict.path_predictor import PathPredictor, PredictorConfig, Vocab
    from ef_jax.predict.runtime import TrainedPredictor
    cfg = model.config
    pc = PredictorConfig(vocab_size=102, num_layers=cfg.num_moe_layers, num_experts=cfg.num_experts,
                         top_k=cfg.top_k, d_model=16, num_heads=2, depth=1, d_ff=32, window=8, ngram_buckets=64,
                         token_rank=4)
    vocab = Vocab([str(i) for i in range(100)])
    params = PathPredictor(pc).init(jax.random.key(0), np.zeros((1, 8, 9), np.int32), np.ones((1, 8), np.int32),
                                    np.zeros((1, 8, pc.num_layers, pc.top_k), np.int32))["params"]
    pol = Predictive(TrainedPredictor(pc, params, vocab).stepper(), top_k=cfg.top_k, horizon=1)
    ref = ef_jax.generate(model, PROMPTS, max_new_tokens=4).tokens
    res = ef_jax.generate(model, PROMPTS, max_new_tokens=4,
                          offload=OffloadConfig(slots_per_layer=cfg.top_k + 1, policy=pol, check=True))
    assert res.tokens == ref and pol.predicted > 0
