"""Token scheduling: which requests decode together (route-aware batching, ExpertFlow arXiv 2410.17954).

A pure planner (numpy only): it reads routes and predictions and returns batches; the engine runs them."""
from ef_jax.sched.route_scheduler import (ContinuousScheduler, TokenScheduler, arrival_batches, predicted_sets,
                                         request_profiles, route_batches, routing_profile)

__all__ = ["ContinuousScheduler", "TokenScheduler", "arrival_batches", "predicted_sets", "request_profiles",
           "route_batches", "routing_profile"]
