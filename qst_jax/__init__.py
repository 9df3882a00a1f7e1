"""qst_jax: Quantized Side Tuning of large language models in JAX."""

__version__ = "0.1.0"
