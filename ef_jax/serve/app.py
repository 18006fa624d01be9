"""The HTTP side: an ASGI app (FastAPI) whose handlers validate, submit to the ServeEngine and relay its events.

POST /v1/completions, /v1/chat/completions → protocol.parse_* → engine.submit(spec, emit) → events on an
asyncio.Queue (emit hops threads with call_soon_threadsafe) → JSON body | SSE chunks, then `data: [DONE]`
GET /v1/models, /health, /metrics (Prometheus text)

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


def create_app(engine: ServeEngine, ctx: ServeContext) -> FastAPI:
    """The app; its lifespan starts the engine thread and shuts it down after the last response."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="ef-jax serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(APIError(str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                               status=exc.status_code))

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return _error(exc)

    async def serve(request: Request, parse):
        spec = parse(protocol.parse_json(await request.body()), ctx)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = engine.submit(spec, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        if spec.stream:
            return _Stream(_sse(job, spec, events), lambda: engine.cancel(job), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
        parts = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return Response(status_code=499)
                    continue
                if ev[0] == "delta":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise APIError(ev[1], type="server_error", code="engine_error", status=500)
                else:
                    return JSONResponse(protocol.response(spec, job.id, ctx.model_name, "".join(parts), ev[1],
                                                          ev[2]))
        finally:
            engine.cancel(job)  # a no-op once finished; frees the row if this handler was cancelled

    async def _sse(job, spec, events):
        if spec.kind == "chat":
            yield protocol.sse(protocol.chunk(spec, job.id, ctx.model_name, "", first=True))
        while True:
            ev = await events.get()
            if ev[0] == "delta":
                yield protocol.sse(protocol.chunk(spec, job.id, ctx.model_name, ev[1]))
                continue
            if ev[0] == "error":
                yield protocol.sse(APIError(ev[1], type="server_error", code="engine_error", status=500).body())
            else:
                _, finish, use = ev
                yield protocol.sse(protocol.chunk(spec, job.id, ctx.model_name, None, finish))
                if spec.include_usage:
                    yield protocol.sse(protocol.chunk(spec, job.id, ctx.model_name, None, use=use))
            yield protocol.sse("[DONE]")
            return

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

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine.snapshot), media_type="text/plain; version=0.0.4")

    return app
