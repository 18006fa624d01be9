"""Expert-routing predictors (baselines now; the ExpertFlow routing-path predictor plugs in beside them)."""
from ef_jax.predict.baselines import FrequencyBaseline, PreviousTokenBaseline, TokenLookupBaseline, recall_at_k

__all__ = ["FrequencyBaseline", "PreviousTokenBaseline", "TokenLookupBaseline", "recall_at_k"]
