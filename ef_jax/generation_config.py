"""A checkpoint's generation_config.json: the sampling defaults its authors chose, applied where a caller gives none.

[generation_config.json] → read_generation_config() → GenerationDefaults (frozen)
    → resolve_sampling(caller's args)
    → SamplingRequest (max_new_tokens, temperature, top_k, top_p, repetition_penalty), each value from the caller,
      else the checkpoint, else ef_jax's own default

As in transformers: `do_sample: false` (or absent) means greedy decoding whatever temperature the file lists; with
`do_sample: true`, temperature / top_k / top_p missing from the file take transformers' GenerationConfig defaults
(1.0 / 50 / 1.0). A caller's temperature wins over do_sample: temperature=0 is greedy, > 0 samples.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

# ef_jax's defaults where neither the caller nor the checkpoint says anything.
DEFAULT_MAX_NEW_TOKENS = 64
# transformers' GenerationConfig defaults, used for fields a do_sample=true file leaves out.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What generation_config.json says (None = the file does not say). `path` names the file for messages."""
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    """The settings a generate call runs with, after defaults. top_k None = no top-k filter."""
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    repetition_penalty: float

    def kwargs(self) -> dict:
        """As generate() keyword arguments: explicit values only (top_k=0 = off, so no checkpoint default applies)."""
        return dict(dataclasses.asdict(self), top_k=self.top_k or 0)


def read_generation_config(path: str) -> GenerationDefaults:
    """GenerationDefaults from `path`/generation_config.json (empty when the file is absent).

    Raises ValueError naming the file when it is not valid JSON or a field has the wrong type."""
    gen_path = os.path.join(path, "generation_config.json")
    raw = read_generation_json(path)
    if raw is None:
        return GenerationDefaults()
    fields = {}
    for name, kind in (("max_new_tokens", int), ("do_sample", bool), ("temperature", float), ("top_k", int),
                       ("top_p", float), ("repetition_penalty", float)):
        v = raw.get(name)
        if v is None:
            continue
        ok = isinstance(v, bool) if kind is bool else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer()))
        if not ok:
            raise ValueError(f"{gen_path}: {name}={v!r} must be {kind.__name__}; fix or delete that field")
        fields[name] = kind(v)
    return GenerationDefaults(**fields, path=gen_path)


def read_generation_json(path: str) -> dict | None:
    """The parsed generation_config.json of checkpoint dir `path`, or None when it has none."""
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return None
    try:
        with open(gen_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{gen_path} is not valid JSON ({e}); fix it, or delete it to use ef_jax's "
                         "defaults") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{gen_path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def resolve_sampling(gen: GenerationDefaults, *, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float | None = None) -> SamplingRequest:
    """Caller's value, else the checkpoint's, else the default; validated (ValueError naming the argument).

    top_k=0 switches the top-k filter off (as in transformers), also when the checkpoint sets one."""
    if max_new_tokens is None:
        max_new_tokens = gen.max_new_tokens if gen.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    sampling_file = bool(gen.do_sample)
    if temperature is None:
        temperature = (gen.temperature if gen.temperature is not None else HF_SAMPLING_DEFAULTS["temperature"]) \
            if sampling_file else 0.0
    # The file's top_k / top_p shape its own sampling; with a greedy file they stay unset (and a caller who turns
    # sampling on by a temperature gets ef_jax's unfiltered defaults unless they give their own).
    if top_k is None:
        top_k = (gen.top_k if gen.top_k is not None else HF_SAMPLING_DEFAULTS["top_k"]) if sampling_file else None
    if top_p is None:
        top_p = (gen.top_p if gen.top_p is not None else HF_SAMPLING_DEFAULTS["top_p"]) if sampling_file else 1.0
    if repetition_penalty is None:
        repetition_penalty = gen.repetition_penalty if gen.repetition_penalty is not None else 1.0
    if not isinstance(top_k, (int, type(None))) or isinstance(top_k, bool) or (top_k is not None and top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be None, 0 (off) or a positive int")
    if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0
            and math.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1.0 = off)")
    return SamplingRequest(max_new_tokens=max_new_tokens, temperature=float(temperature),
                           top_k=top_k or None, top_p=float(top_p), repetition_penalty=float(repetition_penalty))
