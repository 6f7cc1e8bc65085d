"""LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018; the ``lpips`` 0.1.4 package, ``net='vgg'``).

``d(x0, x1) = Σ_k mean_hw( w_k · (n(f_k(x0)) - n(f_k(x1)))² )`` where ``f_k`` are the VGG16 ``features`` taps
after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the scaled input ``(x - shift) / scale``, ``n``
divides each pixel's channel vector by ``(‖·‖₂ + 1e-10)``, and ``w_k ≥ 0`` are the v0.1 linear calibration
weights (a 1×1 conv without bias). DMD's regression loss (docs/method.md §5) uses it on images upsampled to 224.

Note: piq's LPIPS (used by DMD2's regression pretraining) average-pools instead of max-pooling — a
different function; this is the ``lpips`` package's.

Submodules: ``conv1_1 .. conv5_3`` (torchvision ``vgg16.features`` indices 0, 2, 5, 7, 10, 12, 14, 17, 19,
21, 24, 26, 28) and ``lin0 .. lin4``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.models.layers import conv

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# VGG16 stages: (channels, number of 3×3 convs); a 2×2 max-pool starts stages 2–5.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
TAP_CHANNELS = tuple(c for c, _ in VGG16_STAGES)


def vgg16_conv_names() -> list[str]:
  return [f"conv{s + 1}_{i + 1}" for s, (_, n) in enumerate(VGG16_STAGES) for i in range(n)]


class VGG16Features(nn.Module):
  """VGG16 ``features`` up to relu5_3; returns the five LPIPS taps (relu1_2 ... relu5_3)."""
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    taps = []
    for s, (c, n) in enumerate(VGG16_STAGES):
      if s > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i in range(n):
        x = conv(c, 3, self.dtype, f"conv{s + 1}_{i + 1}", precision=self.precision)(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def normalize_channels(x: jax.Array) -> jax.Array:
  """``x / (sqrt(Σ_c x²) + 1e-10)`` over the channel axis, in float32."""
  x = x.astype(jnp.float32)
  # The floor under the sum of squares only keeps the gradient finite at an all-zero channel vector
  # (d sqrt / d s is infinite at 0); it changes the value by < 1e-15, far below EPS.
  sumsq = jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30)
  return x / (jnp.sqrt(sumsq) + EPS)


class LPIPS(nn.Module):
  """LPIPS v0.1 VGG: ``apply({'params': p}, x0, x1) -> [N]`` for NHWC images in [-1, 1] (no resize inside).

  ``dtype`` sets the VGG activations (e.g. ``jnp.bfloat16``); the channel normalisation, the squared
  differences, the linear layers and the means are float32.
  """
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x0, x1):
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    n = x0.shape[0]
    x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
    x = ((x - shift) / scale).astype(self.dtype)
    taps = VGG16Features(dtype=self.dtype, precision=self.precision, name="vgg")(x)
    total = jnp.zeros((n,), jnp.float32)
    for k, f in enumerate(taps):
      f = normalize_channels(f)
      diff = jnp.square(f[:n] - f[n:])
      # lin{k}: 1×1 conv C → 1 without bias (non-negative weights), then the spatial mean.
      d = conv(1, 1, jnp.float32, f"lin{k}", use_bias=False, precision=self.precision)(diff)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def lpips_distance(module: LPIPS, params: Any, x0: jax.Array, x1: jax.Array,
                   resize_to: int = 224) -> jax.Array:
  """LPIPS of NHWC [-1, 1] batches after bilinear upsampling to ``resize_to`` when they are smaller: ``[N]``.

  The upsampling is ``jax.image.resize(..., 'bilinear', antialias=False)``, which equals PyTorch's
  ``F.interpolate(mode='bilinear', align_corners=False)`` for upsampling (DMD: 32/64 px → 224).
  Differentiable in ``x0`` (and ``x1``).
  """
  def up(x):
    n, h, w, c = x.shape
    if resize_to and (h < resize_to or w < resize_to):
      x = jax.image.resize(x.astype(jnp.float32), (n, max(h, resize_to), max(w, resize_to), c),
                           method="bilinear", antialias=False)
    return x

  return module.apply({"params": params}, up(x0), up(x1))
