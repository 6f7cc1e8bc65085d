"""The UNet's attention kernel switch (``dmd_jax.models.unet2d.ATTENTION``): the fused call uses the same
layout and scale as the XLA path; on a CPU 'auto' is the XLA path and 'cudnn' is an error that says so."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.models import unet2d


def _qkv(dtype, n=64, m=77, heads=8, d=40, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(2, n, heads * d)), dtype)
  k = jnp.asarray(r.normal(size=(2, m, heads * d)), dtype)
  v = jnp.asarray(r.normal(size=(2, m, heads * d)), dtype)
  return q, k, v


def test_fused_call_matches_the_xla_path(monkeypatch):
  # jax.nn.dot_product_attention with the arguments the cuDNN branch passes, on its XLA implementation
  q, k, v = _qkv(jnp.float32)
  ours = unet2d.dot_product_attention(q, k, v, heads=8)
  b, n, _ = q.shape
  split = lambda a: a.reshape(b, a.shape[1], 8, 40)
  ref = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=40 ** -0.5, implementation="xla")
  np.testing.assert_allclose(ours, ref.reshape(b, n, 320), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(ours - unet2d.dot_product_attention(q, k, v, heads=4)).max()) > 1e-3  # heads matter


def test_switch_on_cpu(monkeypatch):
  q, k, v = _qkv(jnp.bfloat16)
  monkeypatch.setattr(unet2d, "ATTENTION", "xla")
  xla = unet2d.dot_product_attention(q, k, v, heads=8)
  monkeypatch.setattr(unet2d, "ATTENTION", "auto")
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(unet2d.dot_product_attention(q, k, v, heads=8), xla)   # auto = XLA on a CPU
  monkeypatch.setattr(unet2d, "ATTENTION", "cudnn")
  with pytest.raises(RuntimeError, match="cuDNN"):
    unet2d.dot_product_attention(q, k, v, heads=8)
  q32, k32, v32 = _qkv(jnp.float32)
  unet2d.dot_product_attention(q32, k32, v32, heads=8)       # float32 always takes the XLA path
  monkeypatch.setattr(unet2d, "ATTENTION", "flash")
  with pytest.raises(ValueError, match="unet2d.ATTENTION must be one of"):
    unet2d.dot_product_attention(q, k, v, heads=8)
