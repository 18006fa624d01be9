"""The serving engine: one thread owns the device and drives the continuous-batching pool; HTTP handlers only
submit jobs and receive events.

submit (any thread) → inbox queue → [engine thread, every step boundary]: drop cancelled jobs (their rows free at
once) → admit waiting jobs into free rows (RowPool.join: prefill alone, first token) → pick ≤ max_batch live rows
(TokenScheduler: predicted routes + expert-cache residency, bounded wait; `arrival`: longest-waiting first)
→ RowPool.step → sample → text deltas / stop strings → events to each job's `emit` → finish (EOS, stop string,
max_tokens) frees the row

A job's predicted expert set is the set its last token was routed to (routing is local in time: the next token
tends to reuse it); a joiner's is its prompt's last token's. Everything the HTTP side reads (`snapshot`) is a
dict the engine thread replaces whole, never engine state itself.
"""
from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
import uuid
from typing import Callable

import numpy as np

from ef_jax.engine.loop.continuous import RowPool, expert_sets, resident_experts
from ef_jax.engine.forward.forward import Forward
from ef_jax.sched.route_scheduler import TokenScheduler
from ef_jax.serve.protocol import APIError, RequestSpec, usage
from ef_jax.serve.text import TextStream

log = logging.getLogger("ef_jax.serve")
SCHEDULES = ("route", "arrival")
_WAKE = object()
_OFFLOAD_STATS = ("hits", "misses", "hit_rate", "stall_s", "h2d_bytes", "slots_per_layer")


class Job:
    """One request inside the engine. `emit(event)` is called from the engine thread with ("delta", text),
    ("done", finish_reason, usage) or ("error", message); `cancelled` may be set from any thread."""

    def __init__(self, spec: RequestSpec, emit: Callable[[tuple], None], tokenizer, stop_ids: set[int]):
        self.spec, self.emit = spec, emit
        self.id = ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.seed = spec.seed if spec.seed is not None else secrets.randbits(31)
        self.text = TextStream(tokenizer, list(spec.stop), stop_ids)
        self.out: list[int] = []
        self.row = -1
        self.waited = 0
        self.sets: np.ndarray | None = None   # f32[L·E] predicted experts of its next token
        self.cancelled = False
        self.finish: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None


class ServeEngine:
    """Owns the Forward's use after start(): every prefill, step and expert-cache read happens on its thread.

    Args:
      forward: the Forward (one expert cache) every request runs through.
      tokenizer: the model's tokenizer or None (ids in, ids as text out).
      stop_ids: token ids that end a request (EOS).
      max_batch: B, tokens decoded per step.
      max_live: R ≥ B, requests holding a KV-cache row; when more than B are live the scheduler picks who steps.
      context: cache slots per request (prompt + max_tokens).
      schedule: "route" (ExpertFlow's token scheduler; cache-aware when offloaded) or "arrival" (longest-waiting
        first over the same pool).
      max_wait: steps a live request may be skipped before it must step.
    """

    def __init__(self, forward: Forward, tokenizer, stop_ids: set[int], *, max_batch: int = 8,
                 max_live: int | None = None, context: int = 1024, schedule: str = "route", max_wait: int = 4):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: use 'route' or 'arrival'")
        max_live = max_live or 2 * max_batch
        if not isinstance(max_batch, int) or max_batch < 1 or max_live < max_batch:
            raise ValueError(f"max_batch={max_batch!r} must be a positive int ≤ max_live={max_live}")
        self.forward, self.tokenizer, self.stop_ids = forward, tokenizer, set(stop_ids)
        self.pool = RowPool(forward, max_live, context)
        self.max_batch, self.schedule = max_batch, schedule
        self.scheduler = TokenScheduler(max_batch, route=schedule == "route", max_wait=max_wait,
                                        cache_aware=schedule == "route" and forward.offloaded)
        self.track_routes = schedule == "route" and max_live > max_batch and bool(forward.cfg.moe_layer_ids)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._live: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="ef-jax-engine", daemon=True)
        self._stop = threading.Event()
        self._accepting = True
        self.error: BaseException | None = None
        self._c = collections.Counter({k: 0 for k in ("generated_tokens_total", "prompt_tokens_total",
                                                      "steps_total", "contended_steps_total", "queued_total")})  # engine-thread counters
        self._recent: collections.deque = collections.deque()   # (time, tokens generated) over the last 10 s
        self._occupancy = 0.0
        self.snapshot: dict = {}
        self._published = self._t0 = time.perf_counter()
        self._publish(force=True)

    # ---- any thread --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, spec: RequestSpec, emit: Callable[[tuple], None]) -> Job:
        if not self._accepting or self.error is not None:   # before start() jobs queue up
            raise APIError("the server is shutting down or its engine stopped; retry elsewhere",
                           type="server_error", code="unavailable", status=503)
        job = Job(spec, emit, self.tokenizer, self.stop_ids)
        self._inbox.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """Frees the job's row at the next step boundary (a no-op once it finished)."""
        if job.finish is None:
            job.cancelled = True
            self._inbox.put(_WAKE)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting; ends what is still queued or live (finish reason "cancelled"); joins the thread."""
        self._accepting = False
        self._stop.set()
        self._inbox.put(_WAKE)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take(block=not (self._live or self._waiting))
                self._drop_cancelled()
                self._admit()
                if self._live:
                    self._step()
                self._publish()
        except BaseException as e:  # noqa: BLE001 — the engine must report, not vanish
            log.exception("engine thread failed")
            self.error = e
            for job in list(self._live) + list(self._waiting):
                self._send(job, ("error", f"engine failure: {type(e).__name__}: {e}"))
        finally:
            for job in list(self._live) + list(self._waiting):
                self._end(job, "cancelled")
            self._publish(force=True)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Job):
                    self._waiting.append(item)
                    self._c["queued_total"] += 1
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._live if j.cancelled]:
            self._end(job, "cancelled")
        for job in [j for j in self._waiting if j.cancelled]:
            self._end(job, "cancelled")

    def _admit(self) -> None:
        while self._waiting and self.pool.free_rows():
            job = self._waiting.popleft()
            try:
                job.row, logits, routings = self.pool.join(job.spec.prompt_ids, job.spec.max_tokens)
            except ValueError as e:  # validation already bounds the prompt: a mismatch is a bug, reported
                self._send(job, ("error", str(e)))
                job.finish = "error"
                continue
            self._live.append(job)
            tok = self.pool.sample(logits, [0], [job.spec.sampling], [job.seed], [0])[0]
            if self.track_routes:
                job.sets = expert_sets(self.pool.last_routes(routings, 1), self.forward.cfg.num_experts)[0]
            job.t_first = time.perf_counter()
            self._c["prompt_tokens_total"] += len(job.spec.prompt_ids)
            self._accept(job, int(tok))

    def _pick(self) -> list[Job]:
        live = self._live
        if len(live) <= self.max_batch:
            return list(live)
        self._c["contended_steps_total"] += 1
        waited = np.array([j.waited for j in live])
        if self.track_routes:
            sets = np.stack([j.sets for j in live])
            resident = resident_experts(self.forward) if self.scheduler.cache_aware else None
        else:
            sets, resident = np.zeros((len(live), 1), np.float32), None
        return [live[i] for i in self.scheduler.pick(sets, waited, resident)]

    def _step(self) -> None:
        picked = self._pick()
        R = self.pool.R
        tokens, positions = np.zeros(R, np.int32), np.zeros(R, np.int32)
        for j in self._live:
            tokens[j.row] = j.out[-1]
            positions[j.row] = len(j.spec.prompt_ids) + len(j.out) - 1
        rows = [j.row for j in picked]
        logits, routings = self.pool.step(rows, tokens, positions)
        toks = self.pool.sample(logits, rows, [j.spec.sampling for j in picked], [j.seed for j in picked],
                                [len(j.out) for j in picked])
        if self.track_routes:
            sets = expert_sets(self.pool.last_routes(routings, R), self.forward.cfg.num_experts)
            for j in picked:
                j.sets = sets[j.row]
        chosen = {id(j) for j in picked}
        for j in self._live:
            j.waited = 0 if id(j) in chosen else j.waited + 1
        self._c["steps_total"] += 1
        self._occupancy = len(picked) / self.max_batch
        for j, t in zip(picked, toks):
            self._accept(j, int(t))

    def _accept(self, job: Job, tok: int) -> None:
        job.out.append(tok)
        self._c["generated_tokens_total"] += 1
        self._recent.append((time.perf_counter(), 1))
        finish = None
        if tok in self.stop_ids:
            delta, finish = job.text.flush(), "stop"
        else:
            delta, hit = job.text.push(tok)
            finish = "stop" if hit else None
        if finish is None and len(job.out) >= job.spec.max_tokens:
            delta, finish = delta + job.text.flush(), "length"
        if delta:
            self._send(job, ("delta", delta))
        if finish is not None:
            self._end(job, finish)

    def _end(self, job: Job, finish: str) -> None:
        if job.row >= 0 and self.pool.live[job.row]:
            self.pool.free(job.row)
        if job in self._live:
            self._live.remove(job)
        if job in self._waiting:
            self._waiting.remove(job)
        job.finish = finish
        self._c[f"requests_{finish}_total"] += 1
        L, n = len(job.spec.prompt_ids), len(job.out)
        now = time.perf_counter()
        ttft = (job.t_first - job.t_submit) * 1e3 if job.t_first else float("nan")
        log.info("%s %s prompt_tokens=%d generated_tokens=%d finish=%s latency_ms=%.1f ttft_ms=%.1f",
                 job.id, job.spec.kind, L, n, finish, (now - job.t_submit) * 1e3, ttft)
        self._send(job, ("done", finish, usage(L, n)))

    def _send(self, job: Job, event: tuple) -> None:
        try:
            job.emit(event)
        except RuntimeError:  # the handler's event loop is gone (a client that left during shutdown)
            pass

    def _publish(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._published < 0.25:
            return
        self._published = now
        while self._recent and self._recent[0][0] < now - 10.0:
            self._recent.popleft()
        span = min(10.0, now - self._t0)
        snap = dict(self._c)
        snap.update(queue_depth=len(self._waiting) + self._inbox.qsize(), live_rows=len(self._live),
                    pool_rows=self.pool.R, max_batch=self.max_batch, batch_occupancy=self._occupancy,
                    repacks_total=self.pool.repacks, schedule=self.schedule,
                    tokens_per_second=sum(n for _, n in self._recent) / span if span > 0 else 0.0)
        if self.forward.offloaded:
            st = self.forward.stats()
            snap.update({k: st[k] for k in _OFFLOAD_STATS})
        self.snapshot = snap
