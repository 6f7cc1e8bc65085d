"""Converters from PyTorch / diffusers / EDM checkpoints to our Flax parameters.

Command line: ``python -m dmd_jax.convert <family> --src=... --dst=...``.
"""
