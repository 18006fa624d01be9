"""What `ef-jax generate` shows while it works: streamed text on stdout, a spinner on stderr.

sampled token → TextStream.on_token → decode(prompt + generated) → print only the new, settled text
              → a --stop string seen: cut before it and end the row

Decoding the whole sequence each time (not token by token) keeps word boundaries and multi-byte characters right;
text that may still change is held back: a trailing U+FFFD (half of a UTF-8 character in byte-level BPE) and any
tail that could be the start of a stop string.
"""
from __future__ import annotations

import itertools
import sys
import threading
import time


class TextStream:
    """Prints the prompt, then the continuation as it settles. `tokens` is what was generated (kept on Ctrl-C)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: tuple[str, ...] = (), out=None, echo: bool = True,
                 enabled: bool = True):
        self.tok, self.prompt_ids, self.stops = tokenizer, list(prompt_ids), tuple(s for s in stops if s)
        self.out = out or sys.stdout
        self.enabled = enabled
        self.tokens: list[int] = []
        self.prompt_text = self._decode([]) if tokenizer is not None else " ".join(map(str, prompt_ids))
        self.printed = 0        # characters of the continuation already written
        self.stopped = False    # a stop string was seen
        self._cut: int | None = None
        if echo:
            self._write(self.prompt_text)

    def _decode(self, generated: list[int]) -> str:
        return self.tok.decode(self.prompt_ids + generated, skip_special_tokens=True)

    def _write(self, s: str) -> None:
        if self.enabled and s:
            self.out.write(s)
            self.out.flush()

    def continuation(self) -> str:
        """The generated text so far (after the prompt), cut before a stop string."""
        if self.tok is None:
            return "".join(f" {t}" for t in self.tokens)
        full = self._decode(self.tokens)
        text = full[len(self.prompt_text):] if full.startswith(self.prompt_text) else \
            self.tok.decode(self.tokens, skip_special_tokens=True)
        return text if self._cut is None else text[:self._cut]

    def on_token(self, row: int, token: int) -> bool:
        """generate's on_token callback: prints what settled; True (end the row) once a stop string appears."""
        self.tokens.append(token)
        text = self.continuation()
        for s in self.stops:
            i = text.find(s, max(0, self.printed - len(s)))
            if i >= 0 and (self._cut is None or i < self._cut):
                self._cut = i
        if self._cut is not None:
            text = text[:self._cut]
            self.stopped = True
        settled = len(text) if self.stopped else self._settled(text)
        if settled > self.printed:
            self._write(text[self.printed:settled])
            self.printed = settled
        return self.stopped

    def _settled(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0  # the longest tail of the text that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, end), 0, -1):
                if s.startswith(text[end - n:end]):
                    hold = max(hold, n)
                    break
        return end - hold

    def finish(self) -> str:
        """Writes whatever is still held back (the run ended) and a newline; returns the continuation."""
        text = self.continuation()
        if len(text) > self.printed:
            self._write(text[self.printed:])
            self.printed = len(text)
        self._write("\n")
        return text


class Spinner:
    """A one-line spinner with elapsed seconds on stderr while a slow step runs; silent unless stderr is a TTY."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.active = bool(getattr(self.stream, "isatty", lambda: False)())
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._message = ""

    def start(self, message: str) -> None:
        if not self.active:
            return
        self.stop()
        self._message, self._stop = message, threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def stop(self, *_args) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.stream.write("\r\033[K")
        self.stream.flush()

    def _spin(self) -> None:
        t0 = time.perf_counter()
        for frame in itertools.cycle(self.FRAMES):
            self.stream.write(f"\r{frame} {self._message} {time.perf_counter() - t0:.0f}s")
            self.stream.flush()
            if self._stop.wait(0.1):
                return
