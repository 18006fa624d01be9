"""Building the shipped default model (a small Qwen3-MoE trained on Shakespeare, the KJV and Python source).
Needs the `train` extra (optax, tokenizers): pip install -e ".[train]". See __main__.py for the steps."""
