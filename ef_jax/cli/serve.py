"""`ef-jax serve`: load a checkpoint, build one Forward (one expert cache), the engine thread and the app, and run
them under uvicorn until SIGTERM/SIGINT (then: stop accepting, finish the requests in flight, exit 0).

[--model DIR | org/name] → checks → uvicorn on --host:--port (LoadingApp: /health 503) ∥ loader thread:
ef_jax.load → Forward(model, OffloadConfig | None) → ServeEngine(RowPool, TokenScheduler) → create_app → ready
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from ef_jax.cli.devices import add_devices_arg, add_step_arg, load_mesh
from ef_jax.cli.guards import HOST_COMPUTE_HELP
from ef_jax.cli.convert import add_load_args, load_kwargs

DEFAULT_CONTEXT = 1024


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; its defaults `func` and `fn` are `run`."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or Hub id org/name[@revision] (default: the shipped model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    add_load_args(p)
    add_devices_arg(p)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-memory", default=None,
                        help="device budget for routed experts, e.g. 2GiB, or auto (the device's free memory after "
                             "the other weights, the KV cache of --max-live × --max-context and a margin)")
    budget.add_argument("--slots-per-layer", type=int, default=None, help="device expert slots per MoE layer")
    p.add_argument("--policy", default=None, help="offload cache policy (default lru when offloaded)")
    add_step_arg(p)
    p.add_argument("--host-compute", choices=["never", "auto", "always"], default="never", help=HOST_COMPUTE_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; other than loopback, set --api-key (a warning says so otherwise)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' (default: $EF_JAX_API_KEY, else no key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="tokens decoded per step (default 8)")
    p.add_argument("--max-live", type=int, default=None,
                   help="requests holding a KV-cache row (default 2 x max-batch); above max-batch live requests "
                        "the scheduler picks who steps")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"cache slots per request: prompt + max_tokens (default min(model's max positions, "
                        f"{DEFAULT_CONTEXT}))")
    p.add_argument("--schedule", choices=["route", "arrival"], default="route",
                   help="route: ExpertFlow token scheduler (cache-aware when offloaded); arrival: longest-waiting first")
    p.add_argument("--max-wait", type=int, default=4, help="steps a live request may be skipped (default 4)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--graceful-timeout", type=int, default=60,
                   help="seconds in-flight requests get to finish after SIGTERM (default 60)")
    p.set_defaults(func=run, fn=run)  # ef_jax.cli.commands dispatches on `fn`
    return p


def default_context(model) -> int:
    mpe = None
    f = os.path.join(model.path, "config.json") if model.path else None
    if f and os.path.isfile(f):
        with open(f, encoding="utf-8") as fh:
            mpe = json.load(fh).get("max_position_embeddings")
    return min(int(mpe), DEFAULT_CONTEXT) if mpe else DEFAULT_CONTEXT


def build(model, offload=None, *, max_batch: int = 8, max_live: int | None = None, context: int | None = None,
          schedule: str = "route", max_wait: int = 4, model_name: str | None = None, api_key: str | None = None):
    """(app, engine, forward) for `model`; the app's lifespan starts and stops the engine, the caller closes the
    Forward after the server stopped."""
    from ef_jax.engine.forward.forward import Forward
    from ef_jax.engine.loop.generate import stop_ids
    from ef_jax.serve.app import create_app
    from ef_jax.serve.protocol import ServeContext
    from ef_jax.serve.text import GenerationDefaults
    from ef_jax.serve.worker import ServeEngine
    context = context or default_context(model)
    name = model_name or os.path.basename(os.path.normpath(model.path or "ef-jax"))
    forward = Forward(model, offload, kv_shape=(max_live or 2 * max_batch, context))  # ServeEngine's RowPool
    try:
        engine = ServeEngine(forward, model.tokenizer, stop_ids(model, None), max_batch=max_batch,
                             max_live=max_live, context=context, schedule=schedule, max_wait=max_wait)
    except BaseException:
        forward.close()
        raise
    ctx = ServeContext(model_name=name, tokenizer=model.tokenizer, vocab_size=model.config.vocab_size,
                       context=context, defaults=GenerationDefaults.from_checkpoint(model.path))
    return create_app(engine, ctx, api_key), engine, forward


def _check_budget(args: argparse.Namespace) -> dict | None:
    """The offload budget's kwargs (None: every expert resident), checked against the checkpoint and the support
    table before it loads; --expert-memory auto leaves room for the KV cache of --max-live rows × --max-context."""
    from ef_jax.cli.guards import UsageError
    from ef_jax.cli.model import offload_budget, preflight
    from ef_jax.cli.support import check_run
    from ef_jax.model import default_dtype
    offloaded = bool(args.expert_memory or args.slots_per_layer)
    if args.policy and not offloaded:
        raise UsageError("--policy needs a budget: give --expert-memory or --slots-per-layer")
    pf = preflight("--model", args.model, with_tokenizer=False)
    check_run(offloaded=offloaded, policy=(args.policy or "lru") if offloaded else "resident",
              num_experts=pf.config.num_experts, num_moe_layers=pf.config.num_moe_layers, step=args.step,
              devices=args.devices, auto_budget=args.expert_memory == "auto", host_compute=args.host_compute,
              expert_kernel=args.expert_kernel,
              expert_dims=(pf.config.hidden_size, pf.config.moe_intermediate))
    if not offloaded:
        return None
    mpe = pf.config.max_position_embeddings
    context = args.max_context or (min(mpe, DEFAULT_CONTEXT) if mpe else DEFAULT_CONTEXT)
    budget, _ = offload_budget(args, pf, args.dtype or default_dtype(), (args.max_live or 2 * args.max_batch, context))
    return budget


def run(args: argparse.Namespace) -> int:
    """Run `ef-jax serve`; returns 0 after a graceful shutdown (2 on bad input, via ef_jax.cli.commands). The server
    listens while the model loads (GET /health: 503, then 200)."""
    import threading

    import uvicorn

    from ef_jax.cli.model import checkpoint_dir
    from ef_jax.hub import is_hub_id
    from ef_jax.serve.auth import api_key, warn_if_exposed
    from ef_jax.serve.loading import LoadingApp
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is not None and is_hub_id(args.model):  # clients send the Hub id as the model name
        args.served_model_name = args.served_model_name or args.model.split("@")[0]
    args.model = checkpoint_dir("--model", args.model)  # a Hub id resolved once, before any work
    budget = _check_budget(args)  # before the weights load
    key = api_key(args.api_key)
    warn_if_exposed(args.host, key)
    loading = LoadingApp()
    config = uvicorn.Config(loading, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)
    parts: dict = {}
    loader = threading.Thread(target=_load, args=(args, budget, key, loading, server, parts), daemon=True,
                              name="ef-jax-load")
    # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, drain, lifespan shutdown), then restores this
    # handler and re-raises the signal: a no-op here, so a signalled shutdown returns 0 instead of dying by it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    loader.start()
    try:
        server.run()
    finally:
        if loader.is_alive():  # stopped while loading: nothing to drain, and a load cannot be cancelled
            logging.getLogger("ef_jax.serve").info("stopped while the model was loading")
            logging.shutdown()
            os._exit(0)
        if "engine" in parts:
            parts["engine"].shutdown()
            parts["forward"].close()
    if "error" in parts:
        return 1
    return 0 if parts["engine"].error is None else 1


def _load(args, budget, key, loading, server, parts: dict) -> None:
    """The loader thread: weights → Forward → engine thread → the app takes requests (or the server stops)."""
    import ef_jax
    from ef_jax.cache.config import OffloadConfig
    log = logging.getLogger("ef_jax.serve")
    try:
        model = ef_jax.load(args.model, dtype=args.dtype, **load_kwargs(args), **load_mesh(args))
        offload = None if budget is None else OffloadConfig(**budget, policy=args.policy or "lru", step=args.step,
                                                            host_compute=args.host_compute)
        app, engine, forward = build(model, offload, max_batch=args.max_batch, max_live=args.max_live,
                                     context=args.max_context, schedule=args.schedule, max_wait=args.max_wait,
                                     model_name=args.served_model_name, api_key=key)
        parts.update(engine=engine, forward=forward)
        engine.start()
        loading.ready(app)
        log.info("model loaded: serving %s", args.model)
    except BaseException as e:  # noqa: BLE001 — the server must stop, whatever the load raised
        parts["error"] = e
        log.error("loading %s failed: %s: %s", args.model, type(e).__name__, e)
        server.should_exit = True
