"""HybridPredictor: a trained hybrid head as ExpertFlow's predictor, plus the train-and-evaluate pipeline.

ExpertFlow.on_hidden(j, h) → scores(j, h, targets, context) → per target t: the (j, t) head's logits, reading
the pre-gate scores, the hidden state, the step's token ids (on_step_start), the experts routed at layer j this
step and the previous step's experts at t (CacheView). Pairs beyond the trained distance fall back to pre-gating.

Axes: B batch rows, D model, E experts, L MoE layers.
At batch > 1 the cache only knows each layer's union of experts, so "this token's experts" and "the previous
token's route" are the batch's unions there (the head was trained per token).
"""
from __future__ import annotations

import numpy as np

from ef_jax.hybrid import model as hm
from ef_jax.hybrid.record import Record


class HybridPredictor:
    device_head = True  # the device step runs this head inside its program (ef_jax.engine.programs.device_hybrid)

    def __init__(self, cfg: hm.HybridConfig, params: dict, routers: list, norms: list):
        self.cfg, self.p = cfg, {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.routers = [np.asarray(r, np.float32) for r in routers]
        self.norms = [np.asarray(n, np.float32) for n in norms]
        self.pair_index = {pair: i for i, pair in enumerate(cfg.pairs)}
        self.hidden_point = cfg.point  # ExpertFlow asks the engine for the states the head was trained on

    @classmethod
    def load(cls, directory: str, model) -> "HybridPredictor":
        cfg, params = hm.load(directory)
        mc = model.config
        if (cfg.num_layers, cfg.num_experts, cfg.hidden) != (mc.num_moe_layers, mc.num_experts, mc.hidden_size):
            raise ValueError(f"hybrid head in {directory} was trained for {cfg.num_layers} MoE layers × "
                             f"{cfg.num_experts} experts, D={cfg.hidden}; this model has {mc.num_moe_layers} × "
                             f"{mc.num_experts}, D={mc.hidden_size}: train one on this model's record")
        layers = [model.params["layers"][i] for i in mc.moe_layer_ids]
        return cls(cfg, params, [np.asarray(p["mlp"]["router"]) for p in layers],
                   [np.asarray(p["mlp_norm"]) for p in layers])

    def _hot(self, experts) -> np.ndarray:
        out = np.zeros(self.cfg.num_experts, np.float32)
        if experts is not None and len(experts):
            out[np.asarray(experts)] = 1.0
        return out

    def scores(self, layer: int, hidden: np.ndarray, targets, context: dict) -> dict[int, np.ndarray]:
        """hidden f32[B, D] of MoE layer `layer` → {t: logits f32[B, E]}."""
        hn = hm.rms(hidden, self.cfg.eps)                                # [B, D]
        view, step, tok = context.get("view"), context.get("step", 0), context.get("token_ids")
        cur = self._hot(view.routed(step, layer) if view is not None else None)
        emb = self.p["emb"][np.asarray(tok)] if tok is not None else np.zeros((len(hn), self.cfg.token_dim), np.float32)
        out = {}
        for t in targets:
            zpg = (hn * self.norms[t]) @ self.routers[t]
            i = self.pair_index.get((layer, t))
            if i is None:  # beyond the trained distance: plain pre-gating
                out[t] = zpg
                continue
            prev = self._hot(view.routed(step - 1, t) if view is not None and step > 0 else None)
            p = self.p
            out[t] = (p["a"][t - layer - 1] * zpg + hn @ p["wh"][i] + cur @ p["wc"][i] + prev @ p["wp"][i]
                      + emb @ p["wk"][i] + p["b"][i])
        return out


def train_from_record(rec: Record, out_dir: str | None = None, *, max_distance: int = 8, steps: int = 2000,
                      val_frac: float = 0.2, max_seconds: float | None = None, seed: int = 0, log=print) -> dict:
    """Train a hybrid head on the first 1 − val_frac of `rec`'s tokens, evaluate recall@K by distance on the rest
    (pre-gate alone vs hybrid, with a·e^(−b s)+c fits), save to out_dir when given. Returns the report."""
    N, L, D = rec.hidden.shape
    if L < 2:
        raise ValueError("a hybrid cross-layer predictor needs at least 2 MoE layers")
    E, K = int(rec.routers.shape[-1]), rec.experts.shape[-1]
    cfg = hm.HybridConfig(num_layers=L, num_experts=E, top_k=K, hidden=D, vocab=rec.vocab,
                          max_distance=min(max_distance, L - 1), eps=rec.eps, point=rec.point)
    f = hm.features(cfg, rec, list(rec.routers), list(rec.norms))
    cut = int(N * (1 - val_frac))
    if cut < 1 or cut >= N:
        raise ValueError(f"{N} tokens cannot be split into train and validation with val_frac={val_frac}")
    tr = {k: v[:cut] for k, v in f.items()}
    va = {k: v[cut:] for k, v in f.items()}
    params = hm.train(cfg, tr, va, steps=steps, seed=seed, max_seconds=max_seconds, log=log)
    pre = hm.recall_by_distance(cfg, hm.recall_at_k(va["zpg"], va["y"], K))
    hyb = hm.recall_by_distance(cfg, hm.recall_at_k(np.asarray(hm.head_logits(params, cfg, va)), va["y"], K))
    s = np.arange(1, cfg.max_distance + 1)
    report = {"point": rec.point, "tokens_train": cut, "tokens_val": N - cut, "top_k": K, "distances": s.tolist(),
              "recall_pregate": pre, "recall_hybrid": hyb,
              "fit_pregate": hm.fit_exp_decay(s, np.array(pre)), "fit_hybrid": hm.fit_exp_decay(s, np.array(hyb))}
    if out_dir:
        hm.save(out_dir, cfg, params, report)
    return report
