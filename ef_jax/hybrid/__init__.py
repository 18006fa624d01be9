"""Hybrid cross-layer expert prediction (ExpertFlow, arXiv 2510.26730): record → train-hybrid → expertflow's predictor."""
from ef_jax.lazy import lazy_exports

_EXPORTS = {"HybridPredictor": "ef_jax.hybrid.predictor", "train_from_record": "ef_jax.hybrid.predictor",
            "Record": "ef_jax.hybrid.record", "record": "ef_jax.hybrid.record"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)  # its command's flags load without jax
