"""ef_jax: a JAX/XLA runtime for Mixture-of-Experts LLMs whose experts do not fit in GPU memory."""
