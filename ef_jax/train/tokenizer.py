"""Byte-level BPE for the default model, trained with the `tokenizers` library and saved in the layout
`transformers.AutoTokenizer.from_pretrained(dir)` loads (tokenizer.json + tokenizer_config.json)."""
from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """→ a transformers PreTrainedTokenizerFast. Byte-level, so every input string round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
