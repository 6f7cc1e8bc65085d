"""Test configuration: tests run on CPU; tests that need several devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/helpers.py)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
