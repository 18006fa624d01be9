"""`ef-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching decode loop.

text.py (prompts, deltas, stop strings) · protocol.py (OpenAI shapes, validation) · worker.py (the engine thread:
RowPool + TokenScheduler) · app.py (FastAPI handlers, SSE) · metrics.py (Prometheus); the command is ef_jax/cli/serve.py.
Needs the optional extra `ef-jax[serve]` (fastapi, uvicorn).
"""
