"""Route-aware token scheduler: group requests whose predicted routes overlap into batches of at most B.

[predicted scores per token f32[N, L, E]] → request_profiles → p f32[P, L·E] (how likely request r uses expert e
at layer l on a step) → route_batches: greedy, each batch seeded by the oldest waiting request, then grown by the
request adding the fewest expected distinct experts → list of batches (request indices)

Axes: N tokens, P requests, L MoE layers, E experts per layer, B batch size.

A batch's layer needs the union of its rows' experts; the expected size of that union is Σ_e 1 − Π_r (1 − p_re).
Adding request r to a batch whose experts are still unused with probability u_e = Π (1 − p_·e) raises it by
Σ_e u_e · p_re: the greedy adds the request minimising that. Seeding with the oldest request bounds how long a
request waits (every batch takes the oldest one). Plain numpy; deterministic (ties go to the earlier request).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def request_profiles(scores: np.ndarray, offsets: np.ndarray, *, top_k: int, prefix: int | None = None) -> np.ndarray:
    """f32[P, L·E]: for each request, the fraction of its first `prefix` tokens (all when None) whose predicted
    top-k at layer l holds expert e.

    Args:
        scores: f32[N, L, E] predicted scores of every token, requests concatenated.
        offsets: i[P+1]: request p owns tokens offsets[p]:offsets[p+1].
        top_k: K, experts per token.
        prefix: use only the first `prefix` tokens of each request (what is known when it is scheduled).
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be f32[N, L, E], got shape {list(scores.shape)}")
    N, L, E = scores.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must lie in [1, {E}]")
    top = np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]                 # [N, L, K]
    hot = np.zeros((N, L, E), np.float32)
    np.put_along_axis(hot, top, 1.0, axis=-1)
    out = np.zeros((len(offsets) - 1, L * E), np.float32)
    for p in range(len(offsets) - 1):
        a, b = int(offsets[p]), int(offsets[p + 1])
        if prefix is not None:
            b = min(b, a + prefix)
        if b > a:
            out[p] = hot[a:b].mean(0).reshape(-1)
    return out


def routing_profile(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """A prompt's route profile f32[L·E]: the fraction of its tokens routed to each (MoE layer, expert), from its
    routing i[T, L, K] (what its prefill computes anyway; route_batches groups prompts by these)."""
    T, L, _ = experts.shape
    hot = np.zeros((T, L, num_experts), np.float32)
    np.put_along_axis(hot, experts.astype(np.int64), 1.0, axis=-1)
    return hot.mean(0).reshape(-1)


def arrival_batches(num_requests: int, batch_size: int) -> list[list[int]]:
    """The baseline: consecutive requests in arrival order, B at a time."""
    _check(num_requests, batch_size)
    return [list(range(s, min(s + batch_size, num_requests))) for s in range(0, num_requests, batch_size)]


def route_batches(profiles: np.ndarray, batch_size: int) -> list[list[int]]:
    """Greedy route-aware batching (module docstring). profiles f32[P, F] in [0, 1] (F = L·E) → batches of
    request indices; every request appears exactly once, every batch but the last has exactly B requests."""
    profiles = np.asarray(profiles, np.float32)
    if profiles.ndim != 2:
        raise ValueError(f"profiles must be f32[P, L·E], got shape {list(profiles.shape)}")
    if profiles.size and (profiles.min() < 0 or profiles.max() > 1):
        raise ValueError("profiles must be probabilities in [0, 1] (see request_profiles)")
    P = profiles.shape[0]
    _check(P, batch_size)
    waiting = np.ones(P, bool)
    batches = []
    for seed in range(P):                       # the oldest waiting request seeds the next batch
        if not waiting[seed]:
            continue
        waiting[seed] = False
        batch, unused = [seed], 1.0 - profiles[seed]                                 # unused: f32[F]
        while len(batch) < batch_size and waiting.any():
            cand = np.flatnonzero(waiting)
            added = profiles[cand] @ unused                                          # expected new experts
            r = int(cand[np.argmin(added)])     # argmin keeps the first minimum: the earlier request
            waiting[r] = False
            batch.append(r)
            unused = unused * (1.0 - profiles[r])
        batches.append(batch)
    return batches


class ContinuousScheduler:
    """Continuous batching: whenever rows of a running batch finish, fill the free rows from the waiting queue.

    route=False: first come, first served (the arrival-order baseline). route=True: each free row takes, among
    the `window` oldest waiting requests, the one adding the fewest expected distinct experts to the rows
    still running (the same criterion as route_batches); window bounds how far a request can be overtaken.

    Args:
        profiles: f32[P, L·E] (request_profiles); only read when route=True.
        batch_size: B rows.
        window: how many of the oldest waiting requests are candidates (default 4·B).
    """

    def __init__(self, profiles: np.ndarray, batch_size: int, *, route: bool = True, window: int | None = None):
        self.profiles = np.asarray(profiles, np.float32)
        _check(len(self.profiles), batch_size)
        self.batch_size, self.route = batch_size, route
        self.window = window or 4 * batch_size
        if self.window < 1:
            raise ValueError(f"window={window} must be ≥ 1")

    @property
    def name(self) -> str:
        return "route" if self.route else "arrival"

    def admit(self, running: Sequence[int], waiting: list[int]) -> list[int]:
        """Remove from `waiting` (arrival order) and return the requests that join `running` this step."""
        free = self.batch_size - len(running)
        joined: list[int] = []
        unused = np.prod(1.0 - self.profiles[list(running)], axis=0) if self.route and len(running) else None
        while free > 0 and waiting:
            if not self.route:
                r = waiting.pop(0)
            else:
                cand = waiting[:self.window]
                if unused is None:   # an empty batch: the oldest request seeds it
                    i = 0
                else:
                    i = int(np.argmin(self.profiles[cand] @ unused))
                r = waiting.pop(i)
                u = 1.0 - self.profiles[r]
                unused = u if unused is None else unused * u
            joined.append(r)
            free -= 1
        return joined


def predicted_sets(scores: np.ndarray, top_k: int) -> np.ndarray:
    """f32[N, L·E]: 1 where expert e is among token n's predicted top-k at layer l (scores f32[N, L, E])."""
    scores = np.asarray(scores)
    N, L, E = scores.shape
    top = np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]
    hot = np.zeros((N, L, E), np.float32)
    np.put_along_axis(hot, top, 1.0, axis=-1)
    return hot.reshape(N, L * E)


class TokenScheduler:
    """Per-step token scheduling over a pool of live requests (the ExpertFlow token scheduler).

    A server keeps more requests live (KV caches resident) than it decodes per step. Each step, every live
    request's next token is known (just sampled), and so is its predicted route; this scheduler picks B of them
    whose predicted expert sets overlap most: tokens that waited `max_wait` steps go first (no request starves),
    then the longest-waiting token seeds the batch, then the greedy adds the token with the fewest predicted
    experts not yet in the batch (ties: the longer-waiting, then the earlier request). route=False picks the B
    longest-waiting tokens (round robin: the baseline with the same pool).

    Cache-aware (pick(..., resident=r)): an expert already resident costs no copy, so the greedy adds the token
    with the fewest predicted experts neither in the batch nor in the cache, sets[c] @ (unused · (1 − r)); ties go
    to the token growing the batch's union least (a resident expert still takes a slot: without this, tokens of
    resident and of non-resident experts mix and overflow the slots), then as above. When the cache holds the
    batch's union (B·K ≲ S), bytes depend on reuse across steps, which plain overlap ignores: it picks different
    requests every step and so loses the locality of arrival order. Seeding is unchanged, so a uniform residency
    (nothing or everything resident) gives exactly the plain greedy's choice.

    Args:
        batch_size: B tokens per step.
        route: route-aware (True) or longest-waiting first (False).
        max_wait: steps a live request may be skipped before it must run (default 4).
        cache_aware: ask the caller for residency (a server or simulator reads this flag and passes
            `resident=` to pick; pick itself uses `resident` whenever it is given).
    """

    def __init__(self, batch_size: int, *, route: bool = True, max_wait: int = 4, cache_aware: bool = False):
        _check(0, batch_size)
        if max_wait < 1:
            raise ValueError(f"max_wait={max_wait} must be ≥ 1")
        if cache_aware and not route:
            raise ValueError("cache_aware=True needs route=True (round robin ignores routes and residency)")
        self.batch_size, self.route, self.max_wait, self.cache_aware = batch_size, route, max_wait, cache_aware

    @property
    def name(self) -> str:
        return "round-robin" if not self.route else "route+cache" if self.cache_aware else "route"

    def pick(self, sets: np.ndarray, waited: np.ndarray, resident: np.ndarray | None = None) -> list[int]:
        """Choose the tokens to run this step.

        Args:
            sets: f32[C, F] predicted expert sets (0/1) of the C candidate tokens (live requests, arrival order).
            waited: i[C] steps each candidate has been skipped.
            resident: f32[F] 1 where the expert is resident in the cache (F = L·E, the layout of sets), or None
                (residency unknown: the plain route-aware greedy).
        Returns:
            indices of the ≤ B tokens to run, in pick order.
        """
        sets, waited = np.asarray(sets, np.float32), np.asarray(waited)
        C = len(waited)
        if C <= self.batch_size:
            return list(range(C))
        urgency = np.lexsort((np.arange(C), -waited))    # longest waiting first, then arrival
        if not self.route:
            return urgency[:self.batch_size].tolist()
        if resident is not None:
            resident = np.asarray(resident, np.float32)
            if resident.shape != sets.shape[1:]:
                raise ValueError(f"resident must be f32[{sets.shape[1]}] (sets' layout), got {list(resident.shape)}")
        forced = [int(i) for i in urgency if waited[i] >= self.max_wait][:self.batch_size]
        chosen = forced or [int(urgency[0])]
        taken = np.zeros(C, bool)
        taken[chosen] = True
        unused = np.prod(1.0 - sets[chosen], axis=0)     # f32[F]: 1 where an expert is not yet in the batch
        while len(chosen) < self.batch_size:
            cand = np.flatnonzero(~taken)
            grow = sets[cand] @ unused                   # experts each candidate adds to the batch's union
            load = grow if resident is None else sets[cand] @ (unused * (1.0 - resident))   # ... not resident
            best = cand[np.lexsort((cand, -waited[cand], grow, load))[0]]
            chosen.append(int(best))
            taken[best] = True
            unused = unused * (1.0 - sets[best])
        return chosen


def expected_distinct(profiles: np.ndarray, batch: Sequence[int], num_layers: int) -> float:
    """Expected distinct experts per layer of a batch: mean over layers of Σ_e 1 − Π_r (1 − p_re)."""
    unused = np.prod(1.0 - np.asarray(profiles)[list(batch)], axis=0)
    return float((1.0 - unused).sum() / num_layers)


def _check(num_requests: int, batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if num_requests < 0:
        raise ValueError(f"num_requests={num_requests} must be ≥ 0")
