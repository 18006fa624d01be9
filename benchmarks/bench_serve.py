"""`ef-jax serve` under load: throughput and p50/p99 latency at several concurrencies, arrival vs route scheduling,
experts offloaded; writes benchmarks/results/serve_<model>_<device>.{json,md}.

per schedule: a live server on 127.0.0.1 (the shipped model, --slots-per-layer = 25 % of its experts) → burn-in
requests (compile every program) → per concurrency c: c client threads, each sending --requests-per-client
completions one after another (every other one streamed) with the `openai` client → wall time, latency per
request, TTFT of the streamed ones, tokens, expert-cache hits/misses/H2D bytes over the run (the server's /metrics
counters before and after) → lost (no complete response), duplicated (a response id seen twice) and mismatched
(greedy text differing from the same prompt's text in the first run) responses

    python benchmarks/bench_serve.py [--concurrency 1 4 16] [--max-batch 4] [--max-live 16] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import threading
import time
import urllib.request

import jax
import numpy as np

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.cli.serve import build
from results_io import git_commit, write_results

PROMPTS = [  # the shipped model's three training domains, mixed: their routes differ
    "def parse_args(argv):\n    parser = argparse.", "import os\nimport sys\n\ndef main():", "class Stack:\n    def push(self",
    "for i in range(10):\n    if i %", "ROMEO. But soft, what light", "HAMLET. To be, or not", "KING LEAR. Blow, winds,",
    "First Citizen. Before we proceed", "In the beginning God created", "And the LORD said unto Moses,",
    "Blessed are the meek: for", "The LORD is my shepherd;", "    return self.items.pop()", "try:\n    import json",
    "MACBETH. Is this a dagger", "And it came to pass, when",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                                         if not line.startswith("#"))}


def _one(client, prompt: str, max_tokens: int, stream: bool) -> dict:
    t0 = time.perf_counter()
    try:
        if not stream:
            r = client.completions.create(model="default_model", prompt=prompt, max_tokens=max_tokens)
            c = r.choices[0]
            return dict(id=r.id, text=c.text, finish=c.finish_reason, tokens=r.usage.completion_tokens,
                        latency_s=time.perf_counter() - t0, ttft_s=None)
        text, finish, ids, ttft, n = "", None, set(), None, None
        for ch in client.completions.create(model="default_model", prompt=prompt, max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True}):
            ids.add(ch.id)
            if ch.choices:
                if ttft is None and ch.choices[0].text:
                    ttft = time.perf_counter() - t0
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            if ch.usage is not None:
                n = ch.usage.completion_tokens
        return dict(id=ids.pop() if len(ids) == 1 else None, text=text, finish=finish, tokens=n,
                    latency_s=time.perf_counter() - t0, ttft_s=ttft)
    except Exception as e:  # noqa: BLE001 — a failed request is a lost response, counted
        return dict(id=None, text=None, finish=None, tokens=0, latency_s=time.perf_counter() - t0, ttft_s=None,
                    error=f"{type(e).__name__}: {e}")


def run_load(client, url, concurrency: int, per_client: int, max_tokens: int, reference: dict) -> dict:
    plan = [[(c * per_client + k) % len(PROMPTS) for k in range(per_client)] for c in range(concurrency)]
    before = _metrics(url)

    def worker(c):
        return [(i, _one(client, PROMPTS[i], max_tokens, (c + k) % 2 == 1)) for k, i in enumerate(plan[c])]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        results = [r for rs in ex.map(worker, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    after = _metrics(url)
    ok = [(i, r) for i, r in results if r["finish"] in ("stop", "length")]
    ids = [r["id"] for _, r in ok if r["id"]]
    for i, r in ok:
        reference.setdefault(i, r["text"])
    lat = np.array([r["latency_s"] for _, r in ok])
    ttft = np.array([r["ttft_s"] for _, r in ok if r["ttft_s"] is not None])
    d = {k: after.get(f"ef_jax_{k}", 0.0) - before.get(f"ef_jax_{k}", 0.0)
         for k in ("generated_tokens_total", "expert_cache_hits_total", "expert_cache_misses_total", "h2d_bytes_total",
                   "expert_stall_seconds_total", "decode_steps_total", "contended_steps_total")}
    acc = d["expert_cache_hits_total"] + d["expert_cache_misses_total"]
    tokens = sum(r["tokens"] or 0 for _, r in ok)
    return dict(concurrency=concurrency, requests=len(results), wall_s=wall, tokens=tokens,
                tokens_per_s=tokens / wall, requests_per_s=len(ok) / wall,
                p50_latency_s=float(np.percentile(lat, 50)), p99_latency_s=float(np.percentile(lat, 99)),
                p50_ttft_s=float(np.percentile(ttft, 50)) if len(ttft) else None,
                lost=len(results) - len(ok), duplicated=len(ids) - len(set(ids)),
                mismatched=sum(r["text"] != reference[i] for i, r in ok),
                hit_rate=d["expert_cache_hits_total"] / acc if acc else None,
                h2d_mb_per_token=d["h2d_bytes_total"] / 1e6 / max(d["generated_tokens_total"], 1),
                stall_s=d["expert_stall_seconds_total"], steps=d["decode_steps_total"],
                contended_steps=d["contended_steps_total"],
                errors=sorted({r.get("error") for _, r in results if r.get("error")}))


def bench_schedule(model, schedule: str, args, reference: dict) -> list[dict]:
    import openai
    import uvicorn
    slots = max(1, model.config.num_experts // 4)
    app, engine, forward = build(model, OffloadConfig(slots_per_layer=slots), max_batch=args.max_batch,
                                 max_live=args.max_live, context=args.context, schedule=schedule,
                                 max_wait=args.max_wait)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        run_load(client, url, min(4, args.max_batch), 2, args.max_tokens, {})   # burn-in: compile the programs
        out = []
        for c in args.concurrency:
            r = run_load(client, url, c, args.requests_per_client, args.max_tokens, reference)
            r.update(schedule=schedule, slots_per_layer=slots)
            print(f"{schedule:8s} c={c:3d}: {r['tokens_per_s']:7.1f} tok/s, p50 {r['p50_latency_s']:.2f} s, "
                  f"p99 {r['p99_latency_s']:.2f} s, hit rate {r['hit_rate']:.3f}, lost {r['lost']}, "
                  f"dup {r['duplicated']}, mismatched {r['mismatched']}", flush=True)
            out.append(r)
        return out
    finally:
        server.should_exit = True
        thread.join(60)
        forward.close()


def markdown(rec: dict) -> str:
    lines = [
        f"# `ef-jax serve` under load: {rec['model']}, {rec['device']}",
        "",
        f"Experts offloaded: {rec['slots_per_layer']} of {rec['num_experts']} slots per MoE layer (25 %), LRU. "
        f"Server: --max-batch {rec['max_batch']} (tokens per step), --max-live {rec['max_live']} (KV rows), "
        f"--max-wait {rec['max_wait']}; greedy, {rec['max_tokens']} new tokens per request, "
        f"{rec['requests_per_client']} requests per client (every other one streamed), a bounded client loop with "
        f"the `openai` client on 127.0.0.1. Latency is per request, end to end. Commit {rec['commit']}.",
        "",
        "| schedule | concurrency | requests | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | hit rate | "
        "MB/token H2D | contended steps | lost | duplicated | mismatched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rec["results"]:
        ttft = f"{r['p50_ttft_s']:.2f}" if r["p50_ttft_s"] is not None else "–"
        lines.append(f"| {r['schedule']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {ttft} | {r['hit_rate']:.3f} | "
                     f"{r['h2d_mb_per_token']:.2f} | {r['contended_steps']:.0f}/{r['steps']:.0f} | {r['lost']} | "
                     f"{r['duplicated']} | {r['mismatched']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-live", type=int, default=16)
    ap.add_argument("--max-wait", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--schedules", nargs="+", default=["arrival", "route"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = ef_jax.load()
    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"CPU: {_cpu_name()}, {os.cpu_count()} cores"
    device += f", jax {jax.__version__}"
    reference: dict = {}
    results = [r for s in args.schedules for r in bench_schedule(model, s, args, reference)]
    rec = dict(model="default_model", device=device, commit=git_commit(), num_experts=model.config.num_experts,
               slots_per_layer=results[0]["slots_per_layer"], max_batch=args.max_batch, max_live=args.max_live,
               max_wait=args.max_wait, max_tokens=args.max_tokens, requests_per_client=args.requests_per_client,
               results=results)
    tag = "cpu" if dev.platform == "cpu" else dev.device_kind.replace(" ", "_")
    write_results(args.out, f"serve_default_model_{tag}", rec, markdown(rec))
    print(json.dumps({"lost": sum(r["lost"] for r in results), "duplicated": sum(r["duplicated"] for r in results),
                      "mismatched": sum(r["mismatched"] for r in results)}))


if __name__ == "__main__":
    main()
