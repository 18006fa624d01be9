"""The OpenAI request and response shapes: JSON body → a validated RequestSpec, results → response objects.

body bytes → parse_json → parse_completion | parse_chat (every field checked: type, range, context) → RequestSpec
engine events → completion / chat response or stream chunks (`data: {...}`, then `data: [DONE]`)

Every rejection is an APIError: HTTP 400 with {"error": {"message", "type", "param", "code"}}, the message naming
the field and what to send instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from ef_jax.engine.loop.sampling import SamplingParams
from ef_jax.serve.text import GenerationDefaults, render_chat

MAX_STOPS = 4
MAX_PROMPTS = 16  # prompts in one /v1/completions request (each takes a row, as a request would)
# Known OpenAI fields this server does not implement, with the value that means "off": any other value is a 400.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "response_format": (None,)}


class APIError(Exception):
    """An error the client caused (or, with status ≥ 500, the server): sent as OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.type, self.status = message, param, code, type, status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ServeContext:
    """What validation needs to know about the served model."""
    model_name: str
    tokenizer: Any
    vocab_size: int
    context: int                   # cache slots per request: prompt tokens + max_tokens must fit
    defaults: GenerationDefaults


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    kind: str                      # "completion" | "chat"
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# Every field a request may carry: anything else is a 400 naming it (a typo such as "max_token" must not be ignored).
_SHARED = {"model", "max_tokens", "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p", "top_k",
           "user", *UNSUPPORTED}
FIELDS = {"completion": _SHARED | {"prompt"}, "chat": _SHARED | {"messages", "max_completion_tokens"}}


def _known_fields(body: dict, kind: str) -> None:
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise APIError(f"unknown field '{unknown[0]}'{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: "
                       f"this endpoint reads {', '.join(sorted(FIELDS[kind] - set(UNSUPPORTED)))}; leave it out",
                       param=unknown[0], code="unknown_field")


def _typed(body: dict, name: str, types, what: str, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise APIError(f"'{name}' must be {what}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = float(_typed(body, name, (int, float), "a number", default))
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise APIError(f"'{name}'={v} must lie in {'(' if lo_open else '['}{lo}, {hi}]", param=name,
                       code="invalid_value")
    return v


def _common(body: dict, ctx: ServeContext, prompt_ids: list[int], tokens_field: str) -> dict:
    model = _typed(body, "model", (str,), "a string (see GET /v1/models)")
    if model is None:
        raise APIError(f"'model' is required: use '{ctx.model_name}'", param="model", code="missing_field")
    if model != ctx.model_name:
        raise APIError(f"model '{model}' is not served here; use '{ctx.model_name}'", param="model",
                       code="model_not_found")
    for name, off in UNSUPPORTED.items():
        if name in body and not any(body[name] == o and type(body[name]) is type(o) or body[name] is o for o in off):
            raise APIError(f"'{name}' is not supported by ef-jax serve; leave it out", param=name,
                           code="unsupported_parameter")
    n = _typed(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise APIError(f"'n'={n}: ef-jax serve returns one choice per request; send n=1 (or leave it out)",
                       param="n", code="unsupported_value")
    L, S = len(prompt_ids), ctx.context
    if L + 1 > S:
        raise APIError(f"the prompt has {L} tokens; this server's context is {S} tokens (prompt + max_tokens): "
                       f"shorten the prompt", param="messages" if tokens_field == "max_completion_tokens" else "prompt",
                       code="context_length_exceeded")
    given = body.get(tokens_field, body.get("max_tokens"))
    field = tokens_field if tokens_field in body else "max_tokens"
    if given is None:
        max_tokens = min(ctx.defaults.max_tokens, S - L)
    else:
        max_tokens = _typed({field: given}, field, (int,), "a positive integer")
        if max_tokens < 1:
            raise APIError(f"'{field}'={max_tokens} must be ≥ 1", param=field, code="invalid_value")
        if L + max_tokens > S:
            raise APIError(f"'{field}'={max_tokens} + the prompt's {L} tokens exceed this server's context of {S} "
                           f"tokens: ask for at most {S - L}", param=field, code="context_length_exceeded")
    d = ctx.defaults
    temperature = _number(body, "temperature", d.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True)
    top_k = _typed(body, "top_k", (int,), "an integer (-1 or leave it out: no top-k)", d.top_k)
    if top_k is not None and top_k != -1 and top_k < 1:
        raise APIError(f"'top_k'={top_k} must be ≥ 1, or -1 for none", param="top_k", code="invalid_value")
    seed = _typed(body, "seed", (int,), "an integer")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop",
                       code="invalid_type")
    stream = _typed(body, "stream", (bool,), "true or false", False)
    opts = _typed(body, "stream_options", (dict,), "an object like {\"include_usage\": true}", {})
    include_usage = _typed(opts, "include_usage", (bool,), "true or false", False)
    return dict(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, stream=stream, include_usage=include_usage,
                sampling=SamplingParams(temperature=temperature, top_p=top_p,
                                        top_k=None if top_k in (None, -1) else top_k),
                seed=seed, stop=tuple(s for s in stops if s))


def _tokenize(ctx: ServeContext, text: str, special: bool) -> list[int]:
    return list(ctx.tokenizer(text, add_special_tokens=special)["input_ids"])


def parse_completion(body: dict, ctx: ServeContext) -> list[RequestSpec]:
    """POST /v1/completions. prompt: a string, a list of token ids, or a list of either (one choice per prompt,
    each as if sent alone)."""
    _known_fields(body, "completion")
    prompt = body.get("prompt")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if many else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise APIError(f"'prompt' holds {len(prompts)} prompts; send at most {MAX_PROMPTS} per request",
                       param="prompt", code="invalid_value")
    return [RequestSpec(kind="completion", **_common(body, ctx, _prompt_ids(p, ctx), "max_tokens")) for p in prompts]


def _prompt_ids(prompt, ctx: ServeContext) -> list[int]:
    if isinstance(prompt, str):
        if ctx.tokenizer is None:
            raise APIError("this model has no tokenizer: send 'prompt' as a list of token ids", param="prompt",
                           code="invalid_type")
        ids = _tokenize(ctx, prompt, True)  # as ef_jax.generate tokenizes a text prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(f"'prompt' has token ids {bad[:5]} outside the vocabulary [0, {ctx.vocab_size})",
                           param="prompt", code="invalid_value")
    else:
        raise APIError("'prompt' is required: a non-empty string, list of token ids, or list of those",
                       param="prompt", code="invalid_type" if prompt is not None else "missing_field")
    if not ids:
        raise APIError("'prompt' tokenizes to no tokens: send at least one", param="prompt", code="invalid_value")
    return ids


def parse_chat(body: dict, ctx: ServeContext) -> list[RequestSpec]:
    """POST /v1/chat/completions. messages: [{"role", "content": str | [{"type": "text", "text"}]}]."""
    _known_fields(body, "chat")
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer, so it cannot read chat messages: use /v1/completions with "
                       "token ids", param="messages", code="unsupported_model")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' is required: a non-empty list of {\"role\", \"content\"} objects",
                       param="messages", code="invalid_type" if msgs is not None else "missing_field")
    clean = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(f"messages[{i}] must be {{\"role\": str, \"content\": str or text parts}}",
                           param=f"messages[{i}]", code="invalid_type")
        clean.append({"role": m["role"], "content": content})
    text = render_chat(ctx.tokenizer, clean)
    ids = _tokenize(ctx, text, not getattr(ctx.tokenizer, "chat_template", None))  # a template writes its own BOS
    return [RequestSpec(kind="chat", **_common(body, ctx, ids, "max_completion_tokens"))]


# ---- responses ---------------------------------------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_usage(uses: list[dict]) -> dict:
    return {k: sum(u[k] for u in uses) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def response(spec: RequestSpec, rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    """The non-streamed body; choices[i] = (text, finish_reason) of prompt i."""
    if spec.kind == "chat":
        out = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish} for i, (text, finish) in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": out, "usage": use}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(choices)], "usage": use}


def chunk(spec: RequestSpec, rid: str, model: str, text: str | None, finish: str | None = None,
          use: dict | None = None, first: bool = False, index: int = 0) -> dict:
    """One streamed event of choice `index`; text None with `use` is the final usage-only chunk (choices: [])."""
    if spec.kind == "chat":
        obj = "chat.completion.chunk"
        delta = {} if text is None and not first else {"content": text or ""}
        if first:
            delta["role"] = "assistant"
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        obj = "text_completion"
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None and text is None and finish is None:
        out["choices"] = []
    if use is not None:
        out["usage"] = use
    return out


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


# ---- tokenizer endpoints (vLLM's shapes) -------------------------------------------------------------------------
def parse_tokenize(body: dict, ctx: ServeContext) -> dict:
    """POST /tokenize {"prompt": str, "add_special_tokens": bool = true} → {"tokens", "count", "max_model_len"}."""
    _only(body, {"model", "prompt", "add_special_tokens"})
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer", param="prompt", code="unsupported_model")
    prompt = _typed(body, "prompt", (str,), "a string")
    if prompt is None:
        raise APIError("'prompt' is required: the text to tokenize", param="prompt", code="missing_field")
    ids = _tokenize(ctx, prompt, _typed(body, "add_special_tokens", (bool,), "true or false", True))
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.context}


def parse_detokenize(body: dict, ctx: ServeContext) -> dict:
    """POST /detokenize {"tokens": [int]} → {"prompt": str}."""
    _only(body, {"model", "tokens"})
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer", param="tokens", code="unsupported_model")
    ids = _typed(body, "tokens", (list,), "a list of token ids")
    if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < ctx.vocab_size
                              for t in ids):
        raise APIError(f"'tokens' must be a list of token ids in [0, {ctx.vocab_size})", param="tokens",
                       code="invalid_value" if ids is not None else "missing_field")
    return {"prompt": ctx.tokenizer.decode(ids)}


def _only(body: dict, fields: set) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise APIError(f"unknown field '{unknown[0]}': this endpoint reads {', '.join(sorted(fields))}; leave it out",
                       param=unknown[0], code="unknown_field")
