"""dmd-jax: Distribution Matching Distillation (Yin et al. 2024) and its DMD2 additions in JAX/Flax."""

__version__ = "0.1.0"
