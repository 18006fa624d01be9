"""Policy evaluation: teacher-forced decoding through the offload engine (`ef-jax eval-policy`)."""
from ef_jax.lazy import lazy_exports

_EXPORTS = {n: "ef_jax.evalpolicy.harness" for n in ("PolicyEval", "evaluate_policy", "split_sequences", "text_to_ids")}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)  # its command's flags load without jax
