"""API keys for `ef-jax serve`: with a key set, every request but GET /health, /version and /metrics must carry
`Authorization: Bearer KEY` (as OpenAI's API and clients do), else 401 in OpenAI's error shape.

--api-key KEY | EF_JAX_API_KEY → api_key() → require_key(app, key) (an HTTP middleware)
--host not loopback and no key → warn_if_exposed() prints one warning line
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import sys

ENV = "EF_JAX_API_KEY"
OPEN_PATHS = ("/health", "/version", "/metrics")  # probes and scrapers (load balancers, Prometheus) carry no key


def api_key(flag: str | None) -> str | None:
    """--api-key, else EF_JAX_API_KEY, else None (no key: the server answers everyone who reaches it)."""
    key = flag if flag is not None else os.environ.get(ENV)
    return key or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, key: str | None, out=None) -> bool:
    """One warning line when the server listens beyond this machine with no key; True if it warned."""
    if key or is_loopback(host):
        return False
    print(f"ef-jax serve: warning: listening on {host} with no API key: anyone who reaches this port can use the "
          f"model; set --api-key KEY (or {ENV})", file=out or sys.stderr)
    return True


def unauthorized_body() -> dict:
    return {"error": {"message": "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                                 "with the key the server was started with (--api-key / EF_JAX_API_KEY)",
                      "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


def authorized(header: str | None, key: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # compare_digest: the time taken does not tell an attacker how much of the key matched
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def require_key(app, key: str | None) -> None:
    """Installs the check on a FastAPI/Starlette app (nothing when key is None)."""
    if not key:
        return
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def check(request, call_next):
        if request.url.path in OPEN_PATHS or authorized(request.headers.get("authorization"), key):
            return await call_next(request)
        return JSONResponse(unauthorized_body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
