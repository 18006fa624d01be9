"""The HTTP side: an ASGI app (FastAPI) whose handlers validate, submit to the ServeEngine and relay its events.

POST /v1/completions, /v1/chat/completions → protocol.parse_* → engine.submit(spec, emit) → events on an
asyncio.Queue (emit hops threads with call_soon_threadsafe) → JSON body | SSE chunks, then `data: [DONE]`
POST /tokenize, /detokenize (vLLM's shapes); GET /v1/models, /health, /version, /metrics (Prometheus text)
A list of prompts in /v1/completions: one job per prompt, one indexed choice each (as if each were sent alone).

A streamed request whose client leaves is cancelled when the next chunk cannot be sent; a non-streamed one is
polled for a disconnect twice a second while it waits. Either way the engine frees its row at the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ef_jax.serve import protocol
from ef_jax.serve.auth import require_key
from ef_jax.serve.metrics import render_metrics
from ef_jax.serve.protocol import APIError, ServeContext
from ef_jax.serve.worker import ServeEngine


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Stream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: finished, or its client gone mid-stream."""

    def __init__(self, body, on_close, **kw):
        super().__init__(body, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def create_app(engine: ServeEngine, ctx: ServeContext, api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts the engine thread and shuts it down after the last response. With `api_key`,
    requests must carry it (ef_jax.serve.auth)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="ef-jax serve", lifespan=lifespan)
    require_key(app, api_key)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(APIError(str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                               status=exc.status_code))

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return _error(exc)

    async def serve(request: Request, parse):
        specs = parse(protocol.parse_json(await request.body()), ctx)  # one per prompt
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice index, event)
        jobs = []
        try:
            for i, spec in enumerate(specs):
                jobs.append(engine.submit(spec, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
        except BaseException:
            cancel(jobs)
            raise
        if specs[0].stream:
            return _Stream(_sse(jobs, specs[0], events), lambda: cancel(jobs), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
        parts, done = [[] for _ in jobs], [None] * len(jobs)
        try:
            while not all(done):
                try:
                    i, ev = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel(jobs)
                        return Response(status_code=499)
                    continue
                if ev[0] == "delta":
                    parts[i].append(ev[1])
                elif ev[0] == "error":
                    raise APIError(ev[1], type="server_error", code="engine_error", status=500)
                else:
                    done[i] = ev
            choices = [("".join(p), ev[1]) for p, ev in zip(parts, done)]
            use = protocol.total_usage([ev[2] for ev in done])
            return JSONResponse(protocol.response(specs[0], jobs[0].id, ctx.model_name, choices, use))
        finally:
            cancel(jobs)  # a no-op once finished; frees the rows if this handler was cancelled

    def cancel(jobs):
        for job in jobs:
            engine.cancel(job)

    async def _sse(jobs, spec, events):
        rid, uses = jobs[0].id, {}
        if spec.kind == "chat":
            yield protocol.sse(protocol.chunk(spec, rid, ctx.model_name, "", first=True))
        while len(uses) < len(jobs):
            i, ev = await events.get()
            if ev[0] == "delta":
                yield protocol.sse(protocol.chunk(spec, rid, ctx.model_name, ev[1], index=i))
                continue
            if ev[0] == "error":
                yield protocol.sse(APIError(ev[1], type="server_error", code="engine_error", status=500).body())
                break
            _, finish, uses[i] = ev
            yield protocol.sse(protocol.chunk(spec, rid, ctx.model_name, None, finish, index=i))
        else:
            if spec.include_usage:
                yield protocol.sse(protocol.chunk(spec, rid, ctx.model_name, None,
                                                  use=protocol.total_usage(list(uses.values()))))
        yield protocol.sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, protocol.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, protocol.parse_chat)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": created,
                                            "owned_by": "ef-jax", "max_model_len": ctx.context}]}

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "live_rows": engine.snapshot.get("live_rows"),
                             "queue_depth": engine.snapshot.get("queue_depth")}, status_code=200 if ok else 503)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return protocol.parse_tokenize(protocol.parse_json(await request.body()), ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return protocol.parse_detokenize(protocol.parse_json(await request.body()), ctx)

    @app.get("/version")
    async def version():
        import ef_jax
        return {"version": ef_jax.__version__}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.snapshot), media_type="text/plain; version=0.0.4")

    return app
