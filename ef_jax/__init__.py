"""ef_jax: a JAX/XLA runtime for Mixture-of-Experts LLMs whose experts do not fit in GPU memory.

Public API:
  load(path=None, *, dtype=None) -> Model
  logits(model, token_ids) -> np.ndarray f32[B, T, V]
  generate(model, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, offload) -> GenerationResult
  trace_routing(model, texts_or_token_ids) -> np.ndarray int[N, L_moe, K]
"""
from ef_jax.checkpoint import CheckpointError
from ef_jax.config import ModelConfig
from ef_jax.engine.forward import logits, trace_routing
from ef_jax.engine.generate import GenerationResult, generate
from ef_jax.model import Model, load
from ef_jax.offload.config import OffloadConfig

__all__ = ["CheckpointError", "GenerationResult", "Model", "ModelConfig", "OffloadConfig", "generate", "load", "logits",
           "trace_routing"]
__version__ = "0.1.0"
