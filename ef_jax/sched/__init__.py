"""Token scheduling: which requests decode together (route-aware batching, ExpertFlow arXiv 2410.17954)."""
from ef_jax.sched.route_scheduler import (ContinuousScheduler, TokenScheduler, arrival_batches, predicted_sets,
                                         request_profiles, route_batches)

__all__ = ["ContinuousScheduler", "TokenScheduler", "arrival_batches", "predicted_sets", "request_profiles",
           "route_batches"]
