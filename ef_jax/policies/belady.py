"""Belady's offline-optimal eviction: evict the resident expert whose next use at that layer is farthest away.

[future routing, i[N, L, K]] → next-use index per occurrence (numpy, once) → on_route advances next_use[L][E]
→ victim = argmax next_use over the candidates

Axes: N tokens, L MoE layers, E experts per layer, K experts per token, B tokens per step.

It needs the whole future trace, so it is a simulator-only bound (the replay hands it the trace through
`set_future`). With B tokens per step, step s covers tokens [s·B, (s+1)·B); distances are measured in tokens,
which orders steps the same way.

`lookahead=k` limits the oracle to the routing of the next k tokens after the current step: experts not used
within them look alike and go least recently used first. k = 0 is LRU, k ≥ N is Belady; in between it measures
how much future an eviction rule must know to come near the optimum (benchmarks/bench_eviction_bound.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ef_jax.policies.base import BasePolicy, PolicyContext, Recency


def next_use_index(experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For routing `experts` i[N, L, K] (unique per row) return
        nxt   i64[N, L, K]: the next token > t that uses experts[t, l, k] at layer l, N when none;
        first i64[L, E']: the first token using each (layer, expert), N when none (E' = max id + 1).
    """
    N, L, K = experts.shape
    t = np.broadcast_to(np.arange(N)[:, None, None], experts.shape).ravel()
    l = np.broadcast_to(np.arange(L)[None, :, None], experts.shape).ravel()
    e = experts.ravel().astype(np.int64)
    order = np.lexsort((t, e, l))  # group by (layer, expert), tokens ascending inside a group
    ls, es, ts = l[order], e[order], t[order]
    same = (ls[1:] == ls[:-1]) & (es[1:] == es[:-1])  # element i and i+1 are the same (layer, expert)
    nxt_sorted = np.full(len(order), N, np.int64)
    nxt_sorted[:-1][same] = ts[1:][same]
    nxt = np.empty_like(nxt_sorted)
    nxt[order] = nxt_sorted
    start = np.concatenate([[True], ~same])
    first = np.full((L, int(e.max(initial=0)) + 1), N, np.int64)
    first[ls[start], es[start]] = ts[start]
    return nxt.reshape(N, L, K), first


class Belady(BasePolicy):
    """Offline optimum for demand caching. Args: future (optional) i[N, L, K]; batch_size B tokens per step;
    lookahead: None (the whole future) or k ≥ 0 tokens of it (module docstring)."""
    name = "belady"
    needs_future = True

    def __init__(self, future: np.ndarray | None = None, batch_size: int = 1, lookahead: int | None = None):
        if lookahead is not None and (not isinstance(lookahead, (int, np.integer)) or lookahead < 0):
            raise ValueError(f"lookahead={lookahead!r} must be None (the whole future) or an int ≥ 0")
        self.lookahead = None if lookahead is None else int(lookahead)
        if lookahead is not None:
            self.name = f"belady-{lookahead}"
        self._future = None
        if future is not None:
            self.set_future(future, batch_size)

    @classmethod
    def from_context(cls, context: PolicyContext | None, **kw) -> "Belady":
        """The simulator's context carries the trace being replayed and its tokens per step."""
        if context is not None and context.future is not None and kw.get("future") is None:
            kw.update(future=context.future, batch_size=context.batch_size)
        return cls(**kw)

    def set_future(self, experts: np.ndarray, batch_size: int = 1) -> None:
        """The routing of every token the cache will see, in order: i[N, L, K]; B = `batch_size` tokens/step."""
        experts = np.asarray(experts)
        if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(f"future must be an integer array [N, L, K], got {experts.dtype}{list(experts.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1")
        srt = np.sort(experts, axis=-1)
        if (srt[..., 1:] == srt[..., :-1]).any():
            raise ValueError("future: a token lists the same expert twice at one layer; experts per row must be unique")
        self._future, self._batch = experts, int(batch_size)
        self._nxt, self._first = next_use_index(experts)
        self._fut_rows = experts.tolist()   # Python lists: on_route reads a few entries per call
        self._nxt_rows = self._nxt.tolist()

    def reset(self, num_layers: int, num_experts: int, slots_per_layer: int) -> None:
        super().reset(num_layers, num_experts, slots_per_layer)
        if self._future is None:
            raise ValueError("belady needs the future routing: it runs in the trace simulator (ef-jax sim), or "
                             "build it with Belady(future=experts)")
        N, L, _ = self._future.shape
        if L != num_layers:
            raise ValueError(f"belady future has {L} layers but the cache has {num_layers}")
        first = np.full((L, num_experts), N, np.int64)
        E = min(num_experts, self._first.shape[1])
        first[:, :E] = self._first[:, :E]
        self._next = first.tolist()  # int[L][E]: next token (≥ the current step) that uses the expert
        self.recency = Recency(num_layers, num_experts)  # ties (and experts beyond the lookahead) go LRU

    def on_access(self, layer: int, expert: int, hit: bool) -> None:
        self.recency.touch(layer, expert)

    def on_route(self, layer: int, experts: Sequence[int], view) -> list:
        B, N = self._batch, len(self._fut_rows)
        t0, t1 = view.step * B, min(view.step * B + B, N)
        if t0 >= N:
            raise RuntimeError(f"belady: step {view.step} is past the future trace ({N} tokens, {B} per step)")
        nxt = self._next[layer]
        seen = set()
        for t in range(t0, t1):  # later tokens overwrite: next use after the step's last occurrence
            for e, n in zip(self._fut_rows[t][layer], self._nxt_rows[t][layer]):
                nxt[e] = n
                seen.add(e)
        if not seen.issuperset(experts):  # a subset is fine: one pass of a multi-pass layer
            raise RuntimeError(f"belady: routed {sorted(experts)} at step {view.step} layer {layer} but the future "
                               f"trace says {sorted(seen)}; set_future() must get the trace being replayed")
        return []

    def victim(self, layer: int, candidates: Sequence[int], view) -> int:
        nxt, last = self._next[layer], self.recency.last[layer]
        # with a lookahead the oracle sees up to token t1 + k − 1 (t1: the end of this step); later uses look alike
        N = len(self._fut_rows)
        cap = N if self.lookahead is None else min((view.step + 1) * self._batch, N) + self.lookahead
        return max(candidates, key=lambda e: (min(nxt[e], cap), -last[e]))
