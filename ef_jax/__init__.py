"""ef_jax: a JAX/XLA runtime for Mixture-of-Experts LLMs whose experts do not fit in GPU memory.

Public API:
  load(path=None, *, dtype=None, expert_dtype=None, group_size=None, mesh=None) -> Model
  expert_mesh(num_devices=None) -> jax.sharding.Mesh   (one axis "expert": experts split over devices, ef_jax.mesh)
  logits(model, token_ids) -> np.ndarray f32[B, T, V]
  generate(model, prompts, *, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, offload,
           stop_token_ids, layers_per_group, batch_size, schedule, on_token) -> GenerationResult
  trace_routing(model, texts_or_token_ids) -> np.ndarray int[N, L_moe, K]
  evaluate_policy(model, token_ids, offload=None, *, batch_size, seq_len, max_tokens) -> PolicyEval
           (teacher-forced decoding of a text through the offload engine: hit rate, bytes, stall, perplexity)
What a combination of options cannot do is refused before any work, from one table (ef_jax.cache.support).

Names are imported on first use, so host-only parts (ef_jax.cache, ef_jax.policies, ef_jax.sim) load without jax.
"""
from ef_jax.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "ef_jax.checkpoint",
    "ModelConfig": "ef_jax.config",
    "logits": "ef_jax.engine.loop.api",
    "trace_routing": "ef_jax.engine.loop.api",
    "GenerationResult": "ef_jax.engine.loop.generate",
    "generate": "ef_jax.engine.loop.generate",
    "Model": "ef_jax.model",
    "load": "ef_jax.model",
    "expert_mesh": "ef_jax.mesh",
    "OffloadConfig": "ef_jax.cache.config",
    "PolicySpec": "ef_jax.policies.registry",
    "evaluate_policy": "ef_jax.evalpolicy.harness",
    "PolicyEval": "ef_jax.evalpolicy.harness",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)


def __dir__():
    return sorted(list(globals()) + __all__)
