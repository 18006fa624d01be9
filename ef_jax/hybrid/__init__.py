"""Hybrid cross-layer expert prediction (ExpertFlow, arXiv 2510.26730): record → train-hybrid → expertflow's predictor."""
from ef_jax.hybrid.predictor import HybridPredictor, train_from_record
from ef_jax.hybrid.record import Record, record

__all__ = ["HybridPredictor", "Record", "record", "train_from_record"]
