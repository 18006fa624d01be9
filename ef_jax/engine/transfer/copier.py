"""Copiers: perform the ExpertCache's Loads — move an expert's bytes from the pinned-host store into its slot.

Load → store.fetch (one row of the layer's pinned stack to the device, async) → write_slot (in place, donated pool) → tracked until done
poll() → copies seen finished (non-blocking);  wait(layer, experts, block) → the layer's copies are in its pool

A copier only moves bytes; *when* a copy counts as arrived, and how long compute waited for it, is the clock's
business (ef_jax.engine.transfer.clock), so any copier runs under any clock. Every copier keeps the stacked slot pool (one
ExpertPool of [L, S, ...] leaves) and counts the bytes it really moved. Three ways to move them:
  inline   device_put + a donated slot-write program per load, from the thread that dispatches compute
  thread   device_put from a background thread, slot writes applied on the main thread
  program  nothing is dispatched at issue: the loads travel as pinned-host arguments (the layer's stack and the
           row) of the next MoE layer's expert program, which copies them inside (XLA overlaps in-program copies with the program's compute)

Axes: j MoE layer, e expert, S slots per layer.
"""
from __future__ import annotations

import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.cache.expert_cache import Load
from ef_jax.engine.transfer.store import ExpertStore, write_slot
from ef_jax.engine.telemetry.counters import HostCounters
from ef_jax.engine.telemetry.timeline import Timeline

Key = tuple[int, int]  # (MoE layer, expert)


class InlineCopier:
    """Copies issued from the thread that dispatches compute. JAX orders each slot write before any later compute
    that reads the pool, so `wait(block=False)` has nothing to do; `block=True` waits for the bytes (to time a
    stall on the wall clock)."""
    name = "inline"

    def __init__(self, store: ExpertStore, slots: int, counters: HostCounters, timeline: Timeline | None = None):
        self.store, self.counters, self.timeline = store, counters, timeline
        self.pool = store.empty_pools(slots)               # stacked ExpertPool [L, S, ...] of every MoE layer
        self._inflight: dict[Key, jax.Array] = {}          # (layer, expert) → device buffer being copied
        self.bytes = 0        # bytes really copied host → device
        self.issue_s = 0.0    # host time spent issuing copies

    def issue(self, loads: list[Load]) -> None:
        for ld in loads:
            t = time.perf_counter()
            buf = self.store.fetch(ld.layer, ld.expert)
            self.pool = write_slot(self.pool, buf, jnp.int32(ld.layer), jnp.int32(ld.slot))
            self._inflight[(ld.layer, ld.expert)] = buf
            self.bytes += self.store.bytes_per_expert
            self.counters.dispatches += 2  # the transfer and the slot-write program
            self.issue_s += time.perf_counter() - t
            if self.timeline is not None:  # timing a copy means waiting for it: recorded runs overlap less
                buf.block_until_ready()
                self.timeline.add(f"H2D L{ld.layer} e{ld.expert} ({ld.kind})", "copy", t)

    def poll(self) -> list[Key]:
        done = [k for k, buf in self._inflight.items() if buf.is_ready()]
        for k in done:
            del self._inflight[k]
        return done

    def wait(self, layer: int, experts: np.ndarray, block: bool = True) -> list[Key]:
        waited = []
        for e in experts.tolist():
            buf = self._inflight.pop((layer, e), None)
            if buf is not None:
                if block:
                    buf.block_until_ready()
                waited.append((layer, e))
        if waited and block:
            jax.block_until_ready(self.pool)
        return waited

    def take(self) -> tuple[tuple, np.ndarray]:
        """The loads the next expert program must copy: (host arrays [n_i, W], i32[n, 3] (layer, slot, row of the
        array to copy))."""
        return (), np.zeros((0, 3), np.int32)

    def carried(self, out) -> None:
        """The expert program that carried `take()`'s loads was dispatched; `out` is one of its outputs."""

    def settle(self) -> None:
        """Every issued write is in the pool (slot-content checks read it)."""

    def close(self) -> None:
        self._inflight.clear()


class ThreadCopier(InlineCopier):
    """Copies issued from one background thread; slot writes applied on the main thread in issue order.

    Why: on an H100 with jax 0.11, a `device_put` issued from the thread that has just dispatched compute overlapped
    only ~12 % of its copy time with that compute, while the same copies issued from a separate thread overlapped
    ~55 % (benchmarks/results/transfer_NVIDIA_H100_80GB_HBM3.md). The thread only moves bytes host → device; the
    donated slot write stays on the main thread, so the pool pytree is never touched concurrently. A layer's
    pending writes are applied (in FIFO order) up to the last one it needs before its experts run.

    Measured end to end on the same H100 (benchmarks/results/offload_transfers_*_NVIDIA_H100_80GB_HBM3.md), with
    demand-loading policies (nocache, lru) this mode is slower than inline copies (DeepSeek-V2-Lite shapes, lru,
    50 %: 48.6 vs 60.0 tokens/s): a demand load cannot overlap anything, and the hand-off to the thread adds
    latency. The default is "program" (ProgramCopier), which issues nothing from the host at all. `close()` stops
    the thread.
    """
    name = "thread"

    def __init__(self, store: ExpertStore, slots: int, counters: HostCounters, timeline: Timeline | None = None):
        super().__init__(store, slots, counters, timeline)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ef-jax-h2d")
        self._pending: dict[int, list] = {}  # layer → FIFO of (slot, (layer, expert), future of the device buffer)
        self._landed: list[Key] = []          # written into a pool, not yet reported by poll/wait

    def _copy(self, layer: int, expert: int) -> jax.Array:
        buf = self.store.fetch(layer, expert)
        buf.block_until_ready()  # the future completes when the bytes are on the device
        return buf

    def issue(self, loads: list[Load]) -> None:
        for ld in loads:
            t = time.perf_counter()
            key = (ld.layer, ld.expert)
            fut = self._executor.submit(self._copy, *key)
            self._pending.setdefault(ld.layer, []).append((ld.slot, key, fut, t))
            self.bytes += self.store.bytes_per_expert
            self.issue_s += time.perf_counter() - t

    def _apply(self, layer: int, count: int) -> list[Key]:
        """Writes the first `count` pending copies of `layer` into its pool (blocking on each copy)."""
        q = self._pending.get(layer, [])
        written = []
        for _ in range(min(count, len(q))):
            slot, key, fut, t = q.pop(0)
            self.pool = write_slot(self.pool, fut.result(), jnp.int32(layer), jnp.int32(slot))
            self.counters.dispatches += 2  # the transfer (from the thread) and the slot-write program
            if self.timeline is not None:
                self.timeline.add(f"H2D L{key[0]} e{key[1]}", "copy", t)
            written.append(key)
        return written

    def poll(self) -> list[Key]:
        done, self._landed = self._landed, []
        for layer, q in self._pending.items():
            n = 0
            while n < len(q) and q[n][2].done():
                n += 1
            done += self._apply(layer, n)
        return done

    def wait(self, layer: int, experts: np.ndarray, block: bool = True) -> list[Key]:
        q = self._pending.get(layer, [])
        wanted = {(layer, e) for e in experts.tolist()}
        last = max((n for n, item in enumerate(q) if item[1] in wanted), default=-1)
        written = self._landed + self._apply(layer, last + 1)
        waited = [k for k in written if k in wanted]
        self._landed = [k for k in written if k not in wanted]
        if waited and block:
            jax.block_until_ready(self.pool)
        return waited

    def settle(self) -> None:
        for layer, q in self._pending.items():
            self._landed += self._apply(layer, len(q))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


LOAD_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int) -> int:
    """The padded count of n loads (a few program variants instead of one per count)."""
    for b in LOAD_BUCKETS:
        if n <= b:
            return b
    return -(-n // 256) * 256


class ProgramCopier(InlineCopier):
    """Loads wait on the host until the next MoE layer's expert program, which receives their pinned-host
    buffers as arguments and copies them into the donated pool inside the program (ef_jax.engine.programs.layer).
    Why: a cross-program `device_put` waits for all compute already enqueued (PJRT allocates its destination
    behind the compute stream: 12 % overlap on the H100), while XLA schedules copies inside a program as
    asynchronous copy-start/copy-done beside that program's compute. The program count is padded to
    LOAD_BUCKETS by repeating the last load (an idempotent rewrite of the same bytes). A copy counts as done
    once its program's output is ready."""
    name = "program"

    def __init__(self, store: ExpertStore, slots: int, counters: HostCounters, timeline: Timeline | None = None):
        super().__init__(store, slots, counters, timeline)
        self._queue: list[tuple[Key, int]] = []          # (layer, expert), slot — for the next program
        self._taken: list[Key] = []
        self._carried: list[tuple[list[Key], jax.Array]] = []  # keys, an output of the program carrying them

    def issue(self, loads: list[Load]) -> None:
        t = time.perf_counter()
        for ld in loads:
            self._queue.append(((ld.layer, ld.expert), ld.slot))
            self.bytes += self.store.bytes_per_expert
        self.issue_s += time.perf_counter() - t

    def take(self) -> tuple[tuple, np.ndarray]:
        q, self._queue = self._queue, []
        self._taken = [k for k, _ in q]
        if not q:
            return (), np.zeros((0, 3), np.int32)
        q = q + [q[-1]] * (bucket(len(q)) - len(q))
        srcs = [self.store.program_source(layer, expert) for (layer, expert), _ in q]
        bufs = tuple(a for a, _ in srcs)
        return bufs, np.asarray([(layer, slot, row) for ((layer, _), slot), (_, row) in zip(q, srcs)], np.int32)

    def carried(self, out) -> None:
        if self._taken:
            if self.timeline is not None:  # a copy inside a program is timed by that program (waiting for it)
                t = time.perf_counter()
                out.block_until_ready()
                for layer, expert in self._taken:
                    self.timeline.add(f"H2D L{layer} e{expert} (in program)", "copy", t)
            self._carried.append((self._taken, out))
            self._taken = []

    def poll(self) -> list[Key]:
        done = []
        while self._carried and self._carried[0][1].is_ready():
            done += self._carried.pop(0)[0]
        return done

    def wait(self, layer: int, experts: np.ndarray, block: bool = True) -> list[Key]:
        """Never blocks: a layer's loads are copied inside its own program (or an earlier one) before its experts
        are read — a data dependency through the donated pool — so the host has nothing to wait for, and the
        compute's wait happens inside the programs (host-observed stall is 0; a device profile shows the rest).
        The loads count as arrived."""
        wanted = {(layer, e) for e in experts.tolist()}
        done = [k for k, _ in self._queue if k in wanted]
        keep = []
        for keys, out in self._carried:
            done += [k for k in keys if k in wanted]
            rest = [k for k in keys if k not in wanted]
            if rest:
                keep.append((rest, out))
        self._carried = keep
        return done

    def settle(self) -> None:
        """Queued loads are written by the next program; checks that read the pool call this after it."""

    def close(self) -> None:
        self._queue.clear()
        self._carried.clear()


COPIERS = {"inline": InlineCopier, "thread": ThreadCopier, "program": ProgramCopier}
