"""Decode tokens/s of transformers' `generate`, timed the way ef_jax's stats time it: from the first generated
token (the end of the prefill) to the last, so both sides count decode steps only."""
from __future__ import annotations

import time


class TimingStreamer:
    """A transformers streamer that only keeps a timestamp per put: the prompt first, then each generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode(model, input_ids, new_tokens: int, suppress_eos: bool = True, **generate_kw) -> dict:
    """Greedy generate of up to `new_tokens` (suppress_eos: exactly that many, so every run decodes the same count);
    returns tokens/s over the decode span, prefill seconds and the generated ids of row 0. generate hands each new
    token to the streamer as a host tensor, so a timestamp is taken after that token exists (no extra sync)."""
    import torch
    st = TimingStreamer()
    if suppress_eos:
        generate_kw["min_new_tokens"] = new_tokens
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, streamer=st, **generate_kw)
    B = input_ids.shape[0]
    steps = len(st.times) - 2  # puts: the prompt, then one per generated token; the first token ends the prefill
    span = st.times[-1] - st.times[1] if steps > 0 else float("nan")
    return {"tokens_per_s": steps * B / span if steps > 0 else float("nan"), "decode_s": span,
            "prefill_s": st.times[1] - st.times[0], "generated_tokens": int(out.shape[1] - input_ids.shape[1]) * B,
            "tokens": out[0, input_ids.shape[1]:].tolist()}
