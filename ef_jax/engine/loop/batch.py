"""Prompts → a left-padded token batch with per-row positions and a validity mask.

Rows are left-padded so that every row writes its next token to the same cache slot; positions count only
real tokens, so a padded row computes what the same prompt computes alone. Lengths are bucketed (prompt to a
multiple of PROMPT_BUCKET, cache to a multiple of CACHE_BUCKET) so that calls with similar lengths reuse the
compiled programs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    tokens: np.ndarray     # i32[B, P] left-padded prompt ids (pad = 0)
    valid: np.ndarray      # bool[B, P] real-token mask
    positions: np.ndarray  # i32[B, P] RoPE position of each slot (pads: 0)
    lengths: np.ndarray    # i32[B] prompt lengths
    cache_slots: int       # S ≥ P + max_new_tokens

    @property
    def prompt_slots(self) -> int:
        return self.tokens.shape[1]


def normalize_prompts(prompts: Any, tokenizer, vocab_size: int) -> tuple[list[list[int]], bool]:
    """str | list[str] | list[list[int]] → (token id lists, whether the input was text)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a str, a non-empty list of str, or a non-empty list of lists of token ids; "
                        f"got {type(prompts).__name__}")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are text but this model has no tokenizer files; pass token ids instead "
                             "(a list of lists of ints) or add tokenizer.json to the checkpoint directory")
        ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
        text = True
    elif all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
        ids = [[int(t) for t in p] for p in prompts]
        text = False
    else:
        raise TypeError("prompts must be all str or all lists of token ids, not a mix")
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return ids, text


def cache_slots(prompt_len: int, max_new_tokens: int, bucket: bool = True) -> int:
    """S of a batch whose longest prompt has prompt_len tokens (the bucketed sizes make_batch uses)."""
    if not bucket:
        return prompt_len + max_new_tokens
    return _round_up(_round_up(prompt_len, PROMPT_BUCKET) + max_new_tokens, CACHE_BUCKET)


def make_batch(ids: Sequence[Sequence[int]], max_new_tokens: int, bucket: bool = True) -> PromptBatch:
    B = len(ids)
    lengths = np.array([len(p) for p in ids], np.int32)
    P = _round_up(int(lengths.max()), PROMPT_BUCKET) if bucket else int(lengths.max())
    S = cache_slots(int(lengths.max()), max_new_tokens, bucket)
    tokens = np.zeros((B, P), np.int32)
    valid = np.zeros((B, P), bool)
    positions = np.zeros((B, P), np.int32)
    for b, p in enumerate(ids):
        n = len(p)
        tokens[b, P - n:] = p
        valid[b, P - n:] = True
        positions[b, P - n:] = np.arange(n)
    return PromptBatch(tokens=tokens, valid=valid, positions=positions, lengths=lengths, cache_slots=S)


def text_to_ids(model, text: str) -> list[int]:
    """Tokenize with the model's tokenizer; a model without one reads whitespace-separated token ids."""
    if model.tokenizer is not None:
        return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise ValueError("this model has no tokenizer: the text file must hold whitespace-separated token ids") from None
    V = model.config.vocab_size
    if any(not 0 <= t < V for t in ids):
        raise ValueError(f"token ids must lie in [0, {V})")
    return ids
