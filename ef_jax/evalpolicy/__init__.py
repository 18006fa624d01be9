"""Policy evaluation: teacher-forced decoding through the offload engine (`ef-jax eval-policy`)."""
from ef_jax.evalpolicy.harness import PolicyEval, evaluate_policy, split_sequences, text_to_ids

__all__ = ["PolicyEval", "evaluate_policy", "split_sequences", "text_to_ids"]
