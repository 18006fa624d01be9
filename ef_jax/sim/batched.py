"""Batched replay: requests decode together in batches; each step's layer needs the union of the rows' experts.

[trace prompts = requests] × [static batches | continuous batching | per-step token choice] → each step takes
the next token of every request it runs → per layer: union of their experts → ExpertCache (in passes of ≤ S
experts) on the copy-stream clock → BatchedStats (distinct experts per layer and step, bytes and stall per token)

Axes: N tokens, P requests, L MoE layers, K routed experts per token, E experts per layer, S slots per layer,
B requests per batch.

The same ExpertCache, policies and timing model as ef_jax.sim.replay; the difference is what a step is: there B
consecutive tokens, here the next token of up to B requests (how a server decodes many prompts, and what a
token scheduler chooses). A layer whose union exceeds S runs in passes, as in the engine: each pass requires
at most S experts, waits for them and computes for layer_compute_s / passes.

Static and continuous batches are fixed before the replay; token scheduling (TokenPool) is a lazy step source
that replay_steps interleaves with the cache, so a cache-aware scheduler sees the residency each step starts with,
as a server would.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ef_jax.cache import support
from ef_jax.cache.expert_cache import CacheView, ExpertCache
from ef_jax.cache.timing import CopyStream, get_timing
from ef_jax.policies.base import Policy
from ef_jax.policies.registry import get_policy
from ef_jax.sched.route_scheduler import ContinuousScheduler, TokenScheduler
from ef_jax.sim.replay import PerTokenFigures, replay_layer


@dataclasses.dataclass(frozen=True)
class BatchedStats(PerTokenFigures):
    """What a batched replay measured; accesses are (layer, expert, step) as in ReplayStats."""
    policy: str
    slots_per_layer: int
    batch_size: int          # B: the largest batch
    batches: int             # static batches run (0 under continuous batching)
    tokens: int
    steps: int
    distinct_per_layer: float  # mean over steps and layers of the union size (experts a layer needs per step)
    hits: int
    misses: int
    hit_rate: float
    loads: int
    bytes_h2d: int
    stall_s: float | None
    total_s: float | None
    max_wait: int = 0        # token scheduling: the most steps any live request was skipped

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)

    @property
    def distinct_per_token(self) -> float:
        """Distinct experts a layer loads per token decoded (the union spread over the step's rows)."""
        return self.distinct_per_layer / max(self.tokens_per_step, 1e-9)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bytes_per_token": self.bytes_per_token,
                "stall_per_token_s": self.stall_per_token_s, "tokens_per_step": self.tokens_per_step,
                "distinct_per_token": self.distinct_per_token}


def batch_steps(experts: np.ndarray, offsets: np.ndarray, batches: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Per step, per layer: the sorted union of the experts of the step's tokens (request order is batch order).

    experts i[N, L, K], offsets i[P+1] (request p = tokens offsets[p]:offsets[p+1]); batches: request indices,
    each request exactly once (ValueError otherwise)."""
    P = len(offsets) - 1
    flat = [int(r) for b in batches for r in b]
    if sorted(flat) != list(range(P)):
        raise ValueError(f"batches must hold every request 0..{P - 1} exactly once (got {len(flat)} entries, "
                         f"{len(set(flat))} distinct)")
    steps = []
    for batch in batches:
        lengths = [int(offsets[r + 1] - offsets[r]) for r in batch]
        for t in range(max(lengths, default=0)):
            rows = [int(offsets[r]) + t for r, n in zip(batch, lengths) if t < n]
            block = experts[rows]                                                    # [b, L, K]
            steps.append([np.unique(block[:, l]).tolist() for l in range(experts.shape[1])])
    return steps


def continuous_steps(experts: np.ndarray, offsets: np.ndarray, scheduler) -> list[list[list[int]]]:
    """Per step, per layer, the union of the running requests' experts under continuous batching: before each
    step `scheduler.admit(running, waiting)` fills the free rows (ef_jax.sched.ContinuousScheduler); a request
    leaves after its last token."""
    P = len(offsets) - 1
    waiting, running, pos = list(range(P)), [], {}
    steps = []
    while waiting or running:
        for r in scheduler.admit(list(running), waiting):
            running.append(r)
            pos[r] = int(offsets[r])
        if not running:
            raise RuntimeError(f"scheduler {scheduler!r} admitted nothing with {len(waiting)} requests waiting")
        block = experts[[pos[r] for r in running]]                                    # [b, L, K]
        steps.append([np.unique(block[:, l]).tolist() for l in range(experts.shape[1])])
        for r in running:
            pos[r] += 1
        running = [r for r in running if pos[r] < offsets[r + 1]]
    return steps


def residency(view: CacheView) -> np.ndarray:
    """f32[L·E]: 1 where the cache holds the expert (arrived or in flight), 0 elsewhere; the layout of
    ef_jax.sched.predicted_sets."""
    L, E = view.num_layers, view.num_experts
    out = np.zeros((L, E), np.float32)
    for l in range(L):
        out[l, view.resident(l)] = 1.0
    return out.reshape(-1)


class TokenPool:
    """Token scheduling as a step source: up to `pool` requests are live (admitted first come, first served);
    before each step `scheduler.pick(sets of their next tokens, waited[, resident])` chooses which of them run
    (ef_jax.sched.TokenScheduler), and the step is the per-layer union of their experts.

    A cache-aware scheduler (`scheduler.cache_aware`) is handed the cache's residency as it is when the step
    starts, so the choice and the cache are interleaved: iterate `pool.steps(view)` while replaying each step
    through the cache behind `view` (replay_steps does this when given `pool.steps`). Other schedulers never read
    the view, and their steps are those of a plain list(pool.steps()).

    Args:
        experts: i[N, L, K] the trace's routing; offsets: i[P+1] its request boundaries.
        sets: f32[N, L·E] every token's predicted expert set (ef_jax.sched.predicted_sets).
        scheduler: has pick(sets, waited[, resident]) and batch_size.
        pool: live requests (≥ 1).
    Counters (final once the steps are exhausted): max_wait (longest any request was skipped), rows (tokens run),
    num_steps.
    """

    def __init__(self, experts: np.ndarray, offsets: np.ndarray, sets: np.ndarray, scheduler, pool: int):
        if pool < 1:
            raise ValueError(f"pool={pool} must be ≥ 1")
        self.experts, self.offsets, self.sets = experts, offsets, sets
        self.scheduler, self.pool = scheduler, pool
        self.max_wait = self.rows = self.num_steps = 0

    def steps(self, view: CacheView | None = None) -> Iterator[list[list[int]]]:
        """Yield per step, per layer, the sorted union of the chosen tokens' experts (view: the live cache, read
        before each pick when the scheduler is cache-aware)."""
        experts, offsets = self.experts, self.offsets
        aware = view is not None and self.scheduler.cache_aware
        self.max_wait = self.rows = self.num_steps = 0
        waiting, live, pos, wait = list(range(len(offsets) - 1)), [], {}, {}
        while waiting or live:
            while waiting and len(live) < self.pool:
                r = waiting.pop(0)
                live.append(r)
                pos[r], wait[r] = int(offsets[r]), 0
            cand = (self.sets[[pos[r] for r in live]], np.array([wait[r] for r in live]))
            picked = self.scheduler.pick(*cand, resident=residency(view)) if aware else self.scheduler.pick(*cand)
            run = [live[i] for i in picked]
            if not run:
                raise RuntimeError(f"scheduler {self.scheduler!r} picked no token from {len(live)} live requests")
            block = experts[[pos[r] for r in run]]                                     # [b, L, K]
            self.rows += len(run)
            self.num_steps += 1
            ran = set(run)
            for r in live:
                if r in ran:
                    pos[r], wait[r] = pos[r] + 1, 0
                else:
                    wait[r] += 1
                    self.max_wait = max(self.max_wait, wait[r])
            live = [r for r in live if pos[r] < offsets[r + 1]]
            yield [np.unique(block[:, l]).tolist() for l in range(experts.shape[1])]


def pooled_steps(experts: np.ndarray, offsets: np.ndarray, sets: np.ndarray, scheduler, pool: int
                 ) -> tuple[list[list[list[int]]], dict]:
    """All steps of a TokenPool without a cache (residency unknown: a cache-aware scheduler is not given any).
    Returns (steps, {"max_wait": longest any request was skipped, "mean_rows": tokens per step})."""
    src = TokenPool(experts, offsets, sets, scheduler, pool)
    steps = list(src.steps())
    return steps, {"max_wait": src.max_wait, "mean_rows": src.rows / max(src.num_steps, 1)}


def replay_batches(experts: np.ndarray, offsets: np.ndarray, batches, *, slots_per_layer: int,
                   policy: str | Policy = "lru", timing=None, num_experts: int | None = None,
                   sets: np.ndarray | None = None, pool: int | None = None, check: bool = False) -> BatchedStats:
    """Replay requests (prompts of a trace) decoded together through an ExpertCache.

    Args:
        experts: i[N, L, K] the trace's routing; offsets: i[P+1] its request boundaries.
        batches: how requests share steps, one of
            - static batches: a list of lists of request indices (ef_jax.sched.route_batches), one after another;
            - an ef_jax.sched.ContinuousScheduler: continuous batching;
            - an ef_jax.sched.TokenScheduler: per-step token choice among `pool` live
              requests, from every token's predicted expert set `sets` f32[N, L·E]; a cache-aware one
              (`cache_aware=True`) sees the replayed cache's residency before each step (TokenPool).
        slots_per_layer, policy, timing, num_experts, check: as in ef_jax.sim.replay (online policies only).
    """
    experts = np.asarray(experts)
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"experts must be an integer array [N, L, K], got {experts.dtype}{list(experts.shape)}")
    src = None
    if isinstance(batches, TokenScheduler):
        if sets is None or pool is None:
            raise ValueError("a token scheduler needs sets= (predicted expert sets f32[N, L·E]) and pool=")
        src = TokenPool(experts, offsets, sets, batches, pool)
        steps, B, nb = src.steps, batches.batch_size, 0     # replay_steps hands the pool its cache's view
    elif isinstance(batches, ContinuousScheduler):
        steps, B, nb = continuous_steps(experts, offsets, batches), batches.batch_size, 0
    else:
        steps, B, nb = batch_steps(experts, offsets, batches), max((len(b) for b in batches), default=0), len(batches)
    st = replay_steps(steps, experts.shape[0], num_layers=experts.shape[1], slots_per_layer=slots_per_layer,
                      policy=policy, timing=timing, check=check,
                      num_experts=num_experts or max(int(experts.max(initial=0)) + 1, slots_per_layer))
    return dataclasses.replace(st, batch_size=B, batches=nb, max_wait=src.max_wait if src else 0)


def replay_steps(steps: Iterable[Sequence[Sequence[int]]] | Callable[[CacheView], Iterable[Sequence[Sequence[int]]]],
                 tokens: int, *, num_layers: int, num_experts: int, slots_per_layer: int,
                 policy: str | Policy = "lru", timing=None, check: bool = False) -> BatchedStats:
    """Run per-step, per-layer expert unions (steps[s][l] = sorted expert ids) through an ExpertCache on the
    copy-stream clock; `tokens` is how many tokens the steps decode (for per-token figures).

    steps may also be a function of the cache's read-only view returning the steps lazily (TokenPool.steps): each
    step is then drawn after the previous one has run, so the step source can read the cache as it is."""
    L, E, S = num_layers, num_experts, slots_per_layer
    timing = get_timing(timing)
    pol = get_policy(policy)
    # the simulator builds the policy itself (its own predictor or scores): only the batched-replay rows apply
    support.check(support.Request(offloaded=True, policy=pol.name, policy_by_name=False, predictor=True,
                                  where="batched-replay"))
    cache = ExpertCache(L, E, S, pol, check=check, bytes_per_expert=timing.expert_bytes if timing else 0)
    stream = CopyStream(cache, L, E, timing)
    compute_s = timing.layer_compute_s if timing else 0.0
    t, stall, distinct, num_steps = 0.0, 0.0, 0, 0
    for need_by_layer in (steps(cache.view) if callable(steps) else steps):
        num_steps += 1
        stream.issue(cache.begin_step(), t)
        for l, need in enumerate(need_by_layer):
            distinct += len(need)
            t, waited = replay_layer(cache, stream, l, need, t, compute_s if timing is not None else None)
            stall += waited
        stream.issue(cache.end_step(), t)
    s = cache.stats()
    return BatchedStats(policy=pol.name, slots_per_layer=S, batch_size=0, batches=0, tokens=tokens,
                        steps=num_steps, distinct_per_layer=distinct / max(num_steps * L, 1), hits=s["hits"],
                        misses=s["misses"], hit_rate=s["hit_rate"], loads=s["loads"], bytes_h2d=s["bytes_h2d"],
                        stall_s=stall if timing else None, total_s=t if timing else None)
