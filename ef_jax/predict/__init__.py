"""Expert-routing predictors: history/token-id baselines and the ExpertFlow routing-path predictor.

baselines.py (frequency, previous token, token lookup; recall@K) · path_predictor.py (the Flax model, packing) ·
train.py (optax loop, orbax checkpoint) · evaluate.py (recall tables) · runtime.py (TrainedPredictor, step
predictors for the `predictive` policy) (the commands train-predictor / eval-predictor: ef_jax/cli/predict.py).
The Flax modules import lazily: `import ef_jax.predict` needs only numpy.
"""
from ef_jax.predict.baselines import FrequencyBaseline, PreviousTokenBaseline, TokenLookupBaseline, recall_at_k

__all__ = ["FrequencyBaseline", "PreviousTokenBaseline", "TokenLookupBaseline", "recall_at_k"]
