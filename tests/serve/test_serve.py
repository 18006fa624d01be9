"""`ef-jax serve` against live servers on 127.0.0.1, driven by the real `openai` client: concurrent completions
(some streamed) equal ef_jax.generate alone, chat, stop strings, bad requests get OpenAI error bodies and the
server keeps serving, a disconnect frees its row, a bounded 64-request load loses and duplicates nothing, SIGTERM
exits 0."""
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import ef_jax  # noqa: E402
from ef_jax import OffloadConfig  # noqa: E402
from ef_jax.cli.serve import build  # noqa: E402
from ef_jax.serve.metrics import render_metrics  # noqa: E402
from ef_jax.serve.text import GenerationDefaults, TextStream, render_chat  # noqa: E402

pytestmark = pytest.mark.slow  # among the longest modules: scheduled first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["The river", "Once upon a time there was", "A small cat", "In the morning the", "The old man said",
           "Birds fly"]
OFFLOAD = OffloadConfig(slots_per_layer=8)  # 25 % of the default model's 32 experts per layer


class LiveServer:
    """uvicorn in a thread on a port of its own; stop() shuts it down as SIGTERM would (should_exit)."""

    def __init__(self, model, offload=None, **kw):
        self.app, self.engine, self.forward = build(model, offload, **kw)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        # a shared, loaded CPU box can take minutes for a burst of requests: time out only on a hang
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.forward.close()


def _post(url, raw: bytes):
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def model():
    return ef_jax.load()


@pytest.fixture(scope="module")
def srv(model):
    """The default model offloaded at 25 %, 2 tokens per step over 4 KV rows: the token scheduler chooses."""
    s = LiveServer(model, OFFLOAD, max_batch=2, max_live=4, schedule="route", context=256)
    yield s
    s.stop()


def _complete(client, prompt, n, stream, **kw):
    if not stream:
        r = client.completions.create(model="default_model", prompt=prompt, max_tokens=n, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, r.id
    text, finish, use, ids = "", None, None, set()
    for c in client.completions.create(model="default_model", prompt=prompt, max_tokens=n, stream=True,
                                       stream_options={"include_usage": True}, **kw):
        ids.add(c.id)
        if c.choices:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        if c.usage is not None:
            use = c.usage.completion_tokens
    assert len(ids) == 1
    return text, finish, use, ids.pop()


def test_concurrent_completions_equal_generate_alone(srv, model):
    n = 12
    jobs = [(p, i % 2 == 1, {}) for i, p in enumerate(PROMPTS)]
    jobs.append((PROMPTS[0], True, dict(temperature=0.9, top_p=0.95, seed=7)))   # seeded sampling, streamed
    jobs.append((PROMPTS[2], False, dict(temperature=0.7, extra_body={"top_k": 40}, seed=3)))
    before = dict(srv.engine.snapshot)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: _complete(srv.client, j[0], n, j[1], **j[2]), jobs))
    for (prompt, stream, kw), (text, finish, used, _) in zip(jobs, got):
        alone = ef_jax.generate(model, [prompt], max_new_tokens=n, offload=OFFLOAD,
                                temperature=kw.get("temperature", 0.0), top_p=kw.get("top_p", 1.0),
                                top_k=kw.get("extra_body", {}).get("top_k"), seed=kw.get("seed", 0))
        assert text == alone.texts[0], (prompt, stream, kw)
        assert used == len(alone.tokens[0])
        assert finish == ("stop" if alone.tokens[0][-1] == 0 else "length")
    snap = srv.engine.snapshot
    assert snap["contended_steps_total"] > before.get("contended_steps_total", 0)  # the scheduler picked
    assert snap["live_rows"] == 0 and snap["misses"] > 0


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py sets XLA_FLAGS for 4)")
def test_server_on_two_devices_answers_what_one_device_generates(model):
    """`ef-jax serve --devices 2`'s engine: experts split over a mesh, offloaded per device, the same completions."""
    from ef_jax.mesh import expert_mesh, on_mesh
    s = LiveServer(on_mesh(model, expert_mesh(2)), OFFLOAD, max_batch=2, max_live=2, schedule="route", context=128)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda p: _complete(s.client, p, 6, False)[0], PROMPTS[:2]))
        assert s.forward.stats()["devices"] == 2
    finally:
        s.stop()
    for prompt, text in zip(PROMPTS[:2], got):
        assert text == ef_jax.generate(model, [prompt], max_new_tokens=6).texts[0], prompt


def test_chat_uses_the_fallback_template_and_streams_the_same_text(srv, model):
    msgs = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "A dog"}]
    r = srv.client.chat.completions.create(model="default_model", messages=msgs, max_tokens=10)
    prompt = render_chat(model.tokenizer, msgs)
    assert prompt == "system: You tell short stories.\nuser: A dog\nassistant:"
    alone = ef_jax.generate(model, [prompt], max_new_tokens=10, offload=OFFLOAD)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == alone.texts[0]
    assert r.usage.prompt_tokens == len(model.tokenizer(prompt)["input_ids"])
    parts = [c.choices[0].delta.content or "" for c in srv.client.chat.completions.create(
        model="default_model", messages=msgs, max_completion_tokens=10, stream=True) if c.choices]
    assert "".join(parts) == alone.texts[0]


def test_stop_strings_end_the_text_streamed_or_not(srv, model):
    full = ef_jax.generate(model, [PROMPTS[1]], max_new_tokens=16, offload=OFFLOAD).texts[0]
    stop = full[6:9]
    assert stop.strip(), full
    want = full[:full.find(stop)]
    for stream in (False, True):
        text, finish, used, _ = _complete(srv.client, PROMPTS[1], 16, stream, stop=[stop, "\u2603never"])
        assert (text, finish) == (want, "stop") and used < 16


def test_defaults_come_from_generation_config(srv, model):
    d = GenerationDefaults.from_checkpoint(model.path)
    assert (d.max_tokens, d.temperature) == (64, 0.0)   # the shipped generation_config.json: greedy, 64 tokens
    r = srv.client.completions.create(model="default_model", prompt=PROMPTS[3])
    alone = ef_jax.generate(model, [PROMPTS[3]], max_new_tokens=64, offload=OFFLOAD)
    assert r.choices[0].text == alone.texts[0] and r.usage.completion_tokens == len(alone.tokens[0])


BAD = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (json.dumps({"model": "default_model"}).encode(), "missing_field", "prompt"),
    (json.dumps({"model": "default_model", "prompt": "hi", "max_tokens": "ten"}).encode(), "invalid_type",
     "max_tokens"),
    (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), "model_not_found", "model"),
    (json.dumps({"prompt": "hi"}).encode(), "missing_field", "model"),
    (json.dumps({"model": "default_model", "prompt": "hi", "max_tokens": 256}).encode(), "context_length_exceeded",
     "max_tokens"),
    (json.dumps({"model": "default_model", "prompt": "word " * 300}).encode(), "context_length_exceeded", "prompt"),
    (json.dumps({"model": "default_model", "prompt": "hi", "n": 2}).encode(), "unsupported_value", "n"),
    (json.dumps({"model": "default_model", "prompt": "hi", "temperature": 5}).encode(), "invalid_value",
     "temperature"),
    (json.dumps({"model": "default_model", "prompt": "hi", "stream": "yes"}).encode(), "invalid_type", "stream"),
    (json.dumps({"model": "default_model", "prompt": [1, 99999]}).encode(), "invalid_value", "prompt"),
    (json.dumps({"model": "default_model", "prompt": "hi", "logprobs": 3}).encode(), "unsupported_parameter",
     "logprobs"),
]


@pytest.mark.parametrize("raw,code,param", BAD)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv, raw, code, param):
    status, body = _post(srv.url + "/v1/completions", raw)
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["param"], body["error"]["type"]) == (code, param,
                                                                                        "invalid_request_error")
    assert body["error"]["message"]
    r = srv.client.completions.create(model="default_model", prompt="The sun", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_openai_client_raises_bad_request_with_the_body(srv):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="default_model", messages=[{"role": "user"}], max_tokens=2)
    assert e.value.body["code"] == "invalid_type" and e.value.body["param"] == "messages[0]"
    with pytest.raises(openai.NotFoundError):
        srv.client.embeddings.create(model="default_model", input="x")


def test_models_health_metrics(srv):
    assert [m.id for m in srv.client.models.list().data] == ["default_model"]
    with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    for name in ("ef_jax_generated_tokens_total", "ef_jax_queue_depth", "ef_jax_batch_occupancy",
                 "ef_jax_expert_cache_hits_total", "ef_jax_expert_cache_misses_total", "ef_jax_expert_cache_hit_rate",
                 "ef_jax_expert_stall_seconds_total", "ef_jax_h2d_bytes_total", "ef_jax_tokens_per_second",
                 'ef_jax_requests_total{finish="length"}'):
        assert name in samples, name
        float(samples[name])
    assert float(samples["ef_jax_generated_tokens_total"]) > 0 and float(samples["ef_jax_h2d_bytes_total"]) > 0


def test_metrics_render_nan_and_integers():
    text = render_metrics({"hit_rate": float("nan"), "h2d_bytes": 3.0, "requests_stop_total": 2})
    assert "ef_jax_expert_cache_hit_rate NaN" in text and "ef_jax_h2d_bytes_total 3\n" in text
    assert 'ef_jax_requests_total{finish="stop"} 2' in text


def test_load_64_requests_16_clients_nothing_lost_or_duplicated(srv, model):
    """16 client threads, 4 requests each (every other one streamed): every request gets exactly one complete
    response, its own (the expected text of its prompt), under a response id no other request got."""
    n = 6
    want = {p: ef_jax.generate(model, [p], max_new_tokens=n, offload=OFFLOAD).texts[0] for p in PROMPTS}
    plan = [(c, k, PROMPTS[(c + k) % len(PROMPTS)], (c + k) % 2 == 0) for c in range(16) for k in range(4)]

    def client(c):
        out = []
        for cc, k, prompt, stream in plan:
            if cc == c:
                text, finish, _, rid = _complete(srv.client, prompt, n, stream)
                out.append((k, prompt, text, finish, rid))
        return out

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = [r for rs in ex.map(client, range(16)) for r in rs]
    assert len(results) == 64
    assert len({rid for *_, rid in results}) == 64
    assert all(text == want[prompt] and finish in ("stop", "length") for _, prompt, text, finish, _ in results)


def _stream_raw(port, body: dict, chunks: int):
    """Opens a streamed completion over a raw socket, reads `chunks` SSE events, then drops the connection."""
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 200")
        got = 0
        while got < chunks:
            got += f.readline().startswith(b"data: ")
        f.close()


def test_a_disconnect_frees_its_row(tiny_checkpoint):
    model = ef_jax.load(tiny_checkpoint("mixtral-top2"))   # no EOS: only max_tokens or the client ends a request
    s = LiveServer(model, max_batch=2, max_live=2)
    try:
        _stream_raw(s.port, {"model": os.path.basename(model.path), "prompt": [3, 5, 7],
                             "max_tokens": 240, "stream": True}, chunks=3)
        deadline = time.time() + 20
        while s.engine.snapshot.get("requests_cancelled_total", 0) < 1 or s.engine.snapshot["live_rows"]:
            assert time.time() < deadline, s.engine.snapshot
            time.sleep(0.05)
        assert s.engine.snapshot["generated_tokens_total"] < 240
        assert s.engine.pool.free_rows() == [0, 1]
        r = s.client.completions.create(model=os.path.basename(model.path), prompt=[3, 5, 7], max_tokens=4)
        alone = ef_jax.generate(model, [[3, 5, 7]], max_new_tokens=4).tokens[0]
        assert r.choices[0].text == " ".join(map(str, alone)) and r.choices[0].finish_reason == "length"
    finally:
        s.stop()


def test_text_stream_holds_back_a_stop_prefix():
    ts = TextStream(None, ["7 8"], set())
    assert ts.push(5) == ("5", False)
    assert ts.push(7) == (" ", False)        # "5 7" ends with the start of "7 8": held back
    assert ts.push(8) == ("", True) and ts.text == "5 "
    ts = TextStream(None, ["9"], {0})
    assert ts.push(4) == ("4", False) and ts.push(0) == ("", False) and ts.flush() == ""


def test_sigterm_finishes_the_request_in_flight_and_exits_zero(tiny_checkpoint):
    path = tiny_checkpoint("qwen3moe-norm")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "ef_jax.cli", "serve", "--model", path, "--port", str(port),
                             "--max-batch", "2", "--slots-per-layer", "4", "--served-model-name", "tiny"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 120,
                                                            "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        assert first.startswith(b"data: {"), first
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]") and events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
        log = proc.stdout.read().decode()
        assert "prompt_tokens=3 generated_tokens=120 finish=length" in log   # the per-request log line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_flags():
    from ef_jax.cli.commands import build_parser, main
    a = build_parser().parse_args(["serve", "--max-batch", "2", "--schedule", "arrival", "--slots-per-layer", "4"])
    assert (a.max_batch, a.schedule, a.slots_per_layer, a.host, a.port, a.max_wait) == (2, "arrival", 4,
                                                                                        "127.0.0.1", 8000, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--expert-memory", "1GiB", "--slots-per-layer", "4"])
    assert main(["serve", "--policy", "lru"]) == 2   # a policy needs a budget: one line on stderr, exit 2


def test_route_scheduler_in_the_loop_starves_nobody(tiny_checkpoint):
    """1 token per step over 4 live requests, route-aware and cache-aware: every request keeps stepping — between
    two of a request's tokens the others get at most max_wait + (live - 1) steps — and each still decodes its
    tokens alone."""
    from ef_jax.engine.loop.sampling import SamplingParams
    from ef_jax.serve.protocol import RequestSpec
    from ef_jax.serve.worker import ServeEngine
    from ef_jax.engine.forward.forward import Forward
    model = ef_jax.load(tiny_checkpoint("qwen3moe-norm"))
    prompts = [[3, 5, 7], [50, 51], [9, 9, 9, 9], [70]]
    order, done = [], threading.Event()
    with Forward(model, OffloadConfig(slots_per_layer=2)) as fwd:
        eng = ServeEngine(fwd, None, set(), max_batch=1, max_live=4, context=64, schedule="route", max_wait=2)
        assert eng.scheduler.cache_aware and eng.track_routes
        jobs = [eng.submit(RequestSpec("completion", tuple(p), 10, SamplingParams(), None, (), False, False),
                           lambda ev, i=i: (order.append(i) if ev[0] == "delta" else None,
                                            done.set() if ev[0] == "done" and all(j.finish for j in jobs) else None))
                for i, p in enumerate(prompts)]
        eng.start()
        assert done.wait(120)
        eng.shutdown()
    stepped = order[len(prompts):]   # after the four prefills, one token per step
    for i in range(len(prompts)):
        at = [k for k, j in enumerate(stepped) if j == i]
        assert max(np.diff(at)) - 1 <= 2 + len(prompts) - 1, stepped
    for job, p in zip(jobs, prompts):
        assert job.out == ef_jax.generate(model, [p], max_new_tokens=10, offload=OffloadConfig(slots_per_layer=2)).tokens[0]


def test_chat_uses_the_tokenizers_template_when_it_has_one():
    from transformers import AutoTokenizer

    from ef_jax.model import DEFAULT_MODEL_DIR
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)   # a copy of its own: the template is set only here
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat(tok, msgs) == "<user>Hi<assistant>"
    assert render_chat(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR), msgs) == "user: Hi\nassistant:"
