"""The ASGI app uvicorn serves from its first second: while the model loads it answers GET /health with 503
({"status": "loading"}) and every other request with 503 and Retry-After; once `ready(app)` is called, every
request goes to the real app (ef_jax.serve.app). Load balancers and clients can poll /health instead of guessing.

uvicorn → LoadingApp ─ loading: 503 ─ ready(app): app(scope, receive, send)
"""
from __future__ import annotations

import json


class LoadingApp:
    """The real app's lifespan (the engine thread's start) is run by whoever calls ready(), not by uvicorn."""

    def __init__(self):
        self.app = None

    def ready(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            body = {"status": "loading"}
        else:
            body = {"error": {"message": "the model is still loading: retry when GET /health answers 200",
                              "type": "server_error", "param": None, "code": "model_loading"}}
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
