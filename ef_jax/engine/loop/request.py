"""Checks on a generate request that must pass before any model work: the context length.

prompt ids + max_new_tokens → check_context(cfg) → ContextLengthError (a ValueError) naming max_position_embeddings

Positions past max_position_embeddings are outside what the model was trained on (RoPE tables, YaRN scaling), and
a huge max_new_tokens would otherwise surface as an out-of-memory error from the KV-cache allocation.
"""
from __future__ import annotations

from typing import Sequence

from ef_jax.config import ModelConfig


class ContextLengthError(ValueError):
    """prompt_tokens + max_new_tokens exceeds the model's max_position_embeddings (attributes give the numbers)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, limit: int, prompt_index: int | None):
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit
        self.prompt_index = prompt_index  # None: the only prompt
        super().__init__(self.describe("max_new_tokens"))

    def describe(self, max_new_name: str) -> str:
        """The message, with the max-new-tokens setting called `max_new_name` (a CLI flag or an argument)."""
        n, m, limit = self.prompt_tokens, self.max_new_tokens, self.limit
        which = "the prompt" if self.prompt_index is None else f"prompt {self.prompt_index}"
        head = (f"{which} has {n} tokens + {max_new_name} {m} = {n + m} positions, more than the model's "
                f"max_position_embeddings={limit}")
        if n >= limit:
            return f"{head}: shorten {which} to fewer than {limit} tokens"
        return f"{head}: lower {max_new_name} to at most {limit - n} or shorten {which}"


def check_context(cfg: ModelConfig, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Raises ContextLengthError for the first prompt whose length + max_new_tokens exceeds max_position_embeddings
    (no limit when config.json does not state one)."""
    limit = cfg.max_position_embeddings
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n + max_new_tokens > limit:
            raise ContextLengthError(int(n), int(max_new_tokens), int(limit), None if len(lengths) == 1 else i)
