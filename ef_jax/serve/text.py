"""Text around the engine: prompts in (completion text or ids, chat messages), text deltas and stop strings out.

chat messages → the tokenizer's chat template (when its config has one) | the plain fallback → prompt text
generated ids → TextStream.push (decode, hold back what may still become a stop string or a split character)
→ text deltas, `stopped` when a stop string appears (the text ends before it)

The plain chat fallback, for tokenizers without a chat template, is one line per message and an open assistant
turn:  "<role>: <content>\n" for each message, then "assistant:".
A model without a tokenizer reads and writes token ids as text: generated text is the ids joined by spaces.
"""
from __future__ import annotations

import dataclasses
import json
import os


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text of a chat: the tokenizer's template with an open assistant turn, else the plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class TextStream:
    """Incremental detokenization with stop strings.

    push(id) → (delta, stopped): the new text that is safe to send — a trailing U+FFFD (half a UTF-8 character)
    or a suffix that begins a stop string is held back until the next token decides it. Once a stop string
    appears, the text ends just before it. `text` is everything sent so far.
    """

    def __init__(self, tokenizer, stops: list[str], skip_ids: set[int]):
        self.tokenizer, self.stops, self.skip_ids = tokenizer, [s for s in stops if s], skip_ids
        self.ids: list[int] = []
        self.text = ""

    def _decode(self) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return " ".join(str(t) for t in self.ids if t not in self.skip_ids)

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(int(token))
        full = self._decode()
        hits = [i for i in (full.find(s, max(0, len(self.text) - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = max(min(hits), len(self.text))
            delta, self.text = full[len(self.text):end], full[:end]
            return delta, True
        safe = len(full)
        while safe > len(self.text) and full[safe - 1] == "\ufffd":
            safe -= 1
        hold = 0   # the longest suffix of the safe text that starts a stop string waits
        for s in self.stops:
            hold = max([hold] + [k for k in range(1, min(len(s) - 1, safe - len(self.text)) + 1)
                                 if full[safe - k:safe] == s[:k]])
        safe -= hold
        delta, self.text = full[len(self.text):safe], full[:safe]
        return delta, False

    def flush(self) -> str:
        """At the end of a request (EOS, max_tokens): whatever was held back."""
        full = self._decode()
        delta, self.text = full[len(self.text):], full
        return delta


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Request defaults from the checkpoint's generation_config.json, read as transformers does (greedy unless
    do_sample; then its temperature, top_p, top_k); without the file, OpenAI's (temperature 1, 16 tokens)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    @classmethod
    def from_checkpoint(cls, path: str | None) -> "GenerationDefaults":
        f = os.path.join(path, "generation_config.json") if path else None
        if f is None or not os.path.isfile(f):
            return cls()
        with open(f, encoding="utf-8") as fh:
            g = json.load(fh)
        greedy = not g.get("do_sample", False)   # transformers' GenerationConfig: greedy unless do_sample
        top_k = g.get("top_k")
        return cls(max_tokens=int(g.get("max_new_tokens") or cls.max_tokens),
                   temperature=0.0 if greedy else float(g.get("temperature", cls.temperature)),
                   top_p=1.0 if greedy else float(g.get("top_p", cls.top_p)),
                   top_k=None if greedy or not top_k else int(top_k))
