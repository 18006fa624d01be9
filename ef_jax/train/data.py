"""Token streams per domain and the training batch sampler.

Each domain's documents are tokenized and concatenated with EOS between them into one uint16 stream. A batch
draws its rows' domains uniformly (so the small domains are not drowned by the large one) and a random window
of seq_len+1 tokens from that domain's stream; the sampler is a pure function of (seed, step).
"""
from __future__ import annotations

import numpy as np


def encode_stream(tokenizer, docs: list[str]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return np.asarray(out, np.uint16)


def sample_batch(streams: list[np.ndarray], batch: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """i32[batch, seq_len + 1] windows; row domains uniform over `streams`."""
    rng = np.random.default_rng((seed, step))
    domains = rng.integers(0, len(streams), batch)
    rows = np.empty((batch, seq_len + 1), np.int32)
    for r, d in enumerate(domains):
        s = streams[d]
        start = rng.integers(0, len(s) - seq_len - 1)
        rows[r] = s[start:start + seq_len + 1]
    return rows


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Non-overlapping windows i32[W, seq_len + 1] from the start of a held-out stream."""
    n = min(max_windows, (len(stream) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)
