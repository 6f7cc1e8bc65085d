"""Test configuration: tests run on CPU; tests that need several devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/helpers.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from helpers import CACHE_ENV  # noqa: E402  (after the path above)

for _k, _v in CACHE_ENV.items():   # before jax is imported: JAX's persistent compilation cache (helpers.py)
  os.environ.setdefault(_k, _v)
