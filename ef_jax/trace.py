"""Routing traces on disk: which experts every token used at every MoE layer.

[.npz: experts u8[N, L, K], offsets i64[P+1], prompt_id i32[P], tokens u8 (NUL-terminated UTF-8)] ⇄ RoutingTrace

Axes: N tokens (all prompts, concatenated in order), L MoE layers, K routed experts per token, P prompts.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

REQUIRED_KEYS = ("experts", "offsets", "prompt_id", "tokens")


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    """One recorded routing trace (see data/routing/README.md for the on-disk format)."""
    experts: np.ndarray    # u8[N, L, K]: routed experts of token n at MoE layer l (unordered, unique per row)
    offsets: np.ndarray    # i64[P+1]: prompt p owns tokens offsets[p]:offsets[p+1]
    prompt_id: np.ndarray  # i32[P]: the prompt's id in its source dataset
    tokens: bytes          # N token strings, UTF-8, each followed by b"\0"

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_id)

    def token_strings(self) -> list[str]:
        return [t.decode("utf-8", errors="replace") for t in self.tokens.split(b"\0")[:-1]]

    def prompt(self, p: int) -> np.ndarray:
        """u8[n, L, K]: the routing of prompt p's tokens."""
        return self.experts[self.offsets[p]:self.offsets[p + 1]]


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read and validate a routing trace .npz; ValueError naming the problem when it is malformed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"routing trace {os.fspath(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{os.fspath(path)}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{os.fspath(path)}: missing arrays {missing} (has {sorted(z.files)}); a routing "
                                 f"trace needs {list(REQUIRED_KEYS)}")
            try:
                arrays = {k: z[k] for k in REQUIRED_KEYS}
            except ValueError as err:  # object arrays need pickle, which we never enable
                raise ValueError(f"{os.fspath(path)}: holds object (pickled) arrays; a routing trace is plain "
                                 f"numeric arrays") from err
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{os.fspath(path)}: not a readable .npz file ({err})") from err
    return make_trace(arrays["experts"], arrays["offsets"], arrays["prompt_id"], arrays["tokens"].tobytes(),
                      source=os.fspath(path))


def make_trace(experts: np.ndarray, offsets: np.ndarray, prompt_id: np.ndarray, tokens: bytes, *,
               source: str = "trace") -> RoutingTrace:
    """Validate the four parts and build a RoutingTrace."""
    experts, offsets, prompt_id = np.asarray(experts), np.asarray(offsets), np.asarray(prompt_id)
    if experts.ndim != 3 or experts.dtype != np.uint8:
        raise ValueError(f"{source}: experts must be uint8 [N, L, K], got {experts.dtype}{list(experts.shape)}")
    N = experts.shape[0]
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 1:
        raise ValueError(f"{source}: offsets must be a 1-D integer array [P+1], got {offsets.dtype}"
                         f"{list(offsets.shape)}")
    if offsets[0] != 0 or offsets[-1] != N or (np.diff(offsets) < 0).any():
        raise ValueError(f"{source}: offsets must rise from 0 to N={N}, got {offsets[0]}..{offsets[-1]}"
                         f"{' (not monotone)' if (np.diff(offsets) < 0).any() else ''}")
    if prompt_id.shape != (len(offsets) - 1,):
        raise ValueError(f"{source}: prompt_id has shape {list(prompt_id.shape)}, expected [{len(offsets) - 1}] "
                         f"(one per prompt in offsets)")
    n_tok = tokens.count(b"\0")
    if n_tok != N or (tokens and not tokens.endswith(b"\0")):
        raise ValueError(f"{source}: tokens hold {n_tok} NUL-terminated strings, expected N={N}")
    srt = np.sort(experts, axis=-1)
    if (srt[..., 1:] == srt[..., :-1]).any():
        raise ValueError(f"{source}: some token lists the same expert twice at one layer")
    return RoutingTrace(experts, offsets.astype(np.int64), prompt_id.astype(np.int32), bytes(tokens))


def save_trace(path: str | os.PathLike, trace: RoutingTrace | np.ndarray, offsets: np.ndarray | None = None,
               prompt_id: np.ndarray | None = None, tokens: bytes | list[str] | None = None) -> None:
    """Write a trace in the format load_trace reads (uncompressed, no pickle).

    Either save_trace(path, RoutingTrace) or save_trace(path, experts i[N, L, K], offsets i[P+1],
    prompt_id i[P], tokens) where tokens is N strings (or the NUL-terminated bytes); offsets default to one
    prompt, prompt_id to 0..P-1, tokens to empty strings.
    """
    if not isinstance(trace, RoutingTrace):
        experts = np.asarray(trace)
        if experts.ndim == 3 and np.issubdtype(experts.dtype, np.integer) and experts.dtype != np.uint8:
            if experts.size and (experts.min() < 0 or experts.max() > 255):
                raise ValueError(f"experts ids span {experts.min()}..{experts.max()}; the trace format stores uint8 "
                                 f"(at most 256 experts)")
            experts = experts.astype(np.uint8)
        N = experts.shape[0] if experts.ndim else 0
        offsets = np.array([0, N]) if offsets is None else np.asarray(offsets)
        prompt_id = np.arange(len(offsets) - 1, dtype=np.int32) if prompt_id is None else np.asarray(prompt_id)
        if tokens is None:
            tokens = [""] * N
        if not isinstance(tokens, bytes):
            if any("\0" in t for t in tokens):
                raise ValueError("a token string contains NUL, which the format uses as its separator")
            tokens = b"".join(t.encode("utf-8") + b"\0" for t in tokens)
        trace = make_trace(experts, offsets, prompt_id, tokens, source=os.fspath(path))
    np.savez(path, experts=trace.experts, offsets=trace.offsets, prompt_id=trace.prompt_id,
             tokens=np.frombuffer(trace.tokens, np.uint8))
