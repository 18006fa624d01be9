"""A checkpoint's tokenizer read straight from tokenizer.json by the `tokenizers` library: the part of a Hugging
Face tokenizer ef_jax calls (encode, decode, ids ↔ tokens, EOS), without importing transformers — which imports
torch when it is installed, ~10 s of CPU before the first token.

checkpoint dir → can_read_fast (tokenizer.json, a config we read exactly) ─ yes → FastTokenizer
                                                                         └ no  → transformers.AutoTokenizer

Anything else (apply_chat_template, a rare attribute) is served by the transformers tokenizer of the same
directory, loaded on first use (FastTokenizer.__getattr__), so callers see one interface either way.
"""
from __future__ import annotations

import json
import os
import sys

# tokenizer_config.json keys that make transformers change what tokenizer.json says (a BOS/EOS added by the
# tokenizer class, code of the repo's own): such checkpoints go through transformers, which applies them.
_NEEDS_TRANSFORMERS = ("add_bos_token", "add_eos_token", "auto_map", "legacy", "add_prefix_space")


def import_transformers_quietly():
    # ef_jax uses transformers only for tokenizers, which need no torch; transformers' import-time advice
    # "PyTorch was not found. Models won't be available ..." reads like a broken install, so mute it (only it:
    # the switch is restored once transformers is imported).
    if "transformers" in sys.modules:
        return
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        import transformers  # noqa: F401
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _config(path: str) -> dict:
    f = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def can_read_fast(path: str) -> bool:
    """tokenizer.json is there and tokenizer_config.json asks for nothing beyond it."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    try:
        cfg = _config(path)
    except (OSError, ValueError):
        return False  # transformers reports a broken config in its own words
    return not any(cfg.get(k) not in (None, False) for k in _NEEDS_TRANSFORMERS)


def _token_text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (for configs with clean_up_tokenization_spaces: true)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class FastTokenizer:
    """tokenizers.Tokenizer behind transformers' calling convention: tok(text, add_special_tokens=True)
    ["input_ids"], tok.decode(ids, skip_special_tokens=...), convert_ids_to_tokens, eos_token_id, chat_template."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.path = path
        self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg = _config(path)
        self._clean = bool(cfg.get("clean_up_tokenization_spaces", False))
        for name in ("eos", "bos", "pad", "unk"):
            text = _token_text(cfg.get(f"{name}_token"))
            setattr(self, f"{name}_token", text)
            setattr(self, f"{name}_token_id", self._tok.token_to_id(text) if text is not None else None)
        template = cfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as fh:
                template = fh.read()
        self.chat_template = template
        self._slow = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean else text

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __getattr__(self, name: str):
        # only called for attributes this class lacks (apply_chat_template, ...): the transformers tokenizer has them
        if name.startswith("__") or name in ("_slow", "_tok", "path"):
            raise AttributeError(name)
        if self._slow is None:
            import_transformers_quietly()
            from transformers import AutoTokenizer
            self._slow = AutoTokenizer.from_pretrained(self.path)
        return getattr(self._slow, name)


def load(path: str):
    """The fast tokenizer when tokenizer.json says everything, else transformers' AutoTokenizer."""
    if can_read_fast(path):
        return FastTokenizer(path)
    import_transformers_quietly()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
