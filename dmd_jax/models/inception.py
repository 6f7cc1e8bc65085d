"""The FID variant of Inception-v3 (pytorch-fid's ``FIDInceptionA/C/E``), returning the 2048-d pool features.

This is the network behind every FID number we compare with (EDM, DMD, DMD2, pytorch-fid): the
``pt_inception-2015-12-05`` weights in torchvision ``inception_v3`` naming. It differs from torchvision's
ImageNet Inception-v3 in three places, all reproduced here:

- the average-pool branches of the A, C and first E blocks use ``count_include_pad=False``;
- the last E block (``Mixed_7c``) max-pools in its pool branch;
- the output is the global average pool of ``Mixed_7c`` (2048 channels), not the logits.

Every convolution is a ``BasicConv``: convolution without bias, BatchNorm in inference mode (eps 1e-3),
ReLU. Submodules carry torchvision's names (``Conv2d_1a_3x3``, ``Mixed_5b/branch5x5_1``, ...), each with a
``conv`` and a ``bn``, so converted parameters read like the PyTorch state dict.

Input: NHWC float images already resized to 299×299 and normalised to [-1, 1] (see
``dmd_jax.evaluation.fid`` for the two resize/normalise protocols). Output: ``[N, 2048]`` float32.

Run it with ``precision=jax.lax.Precision.HIGHEST`` for FID: on TPU the default float32 matmul uses bf16
passes, which moves the features by ~1e-3 relative.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Precision = Any
BN_EPS = 1e-3


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference mode: ``(x - mean) / sqrt(var + eps) * scale + bias``.

  The running statistics live in ``params`` (as ``mean`` and ``var``) next to ``scale`` and ``bias``: this
  network is only ever evaluated, and one collection keeps saving, loading and sharding simple.
  """
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * mul + (bias - mean * mul)


class BasicConv(nn.Module):
  """torchvision ``BasicConv2d``: conv (no bias) → BatchNorm(eps=1e-3) → ReLU."""
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision, name="conv")(x)
    x = FrozenBatchNorm(name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # pytorch-fid: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """``FIDInceptionA`` (Mixed_5b/5c/5d)."""
  pool_features: int
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision ``InceptionB`` (Mixed_6a): grid reduction 35 → 17."""
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b3 = conv(384, 3, strides=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """``FIDInceptionC`` (Mixed_6b..6e): factorised 7×7 convolutions."""
  channels_7x7: int
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision ``InceptionD`` (Mixed_7a): grid reduction 17 → 8."""
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """``FIDInceptionE_1`` (Mixed_7b, average pool) / ``FIDInceptionE_2`` (Mixed_7c, ``max_pool=True``)."""
  max_pool: bool = False
  precision: Precision = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:  # pytorch-fid's TF-graph quirk: Mixed_7c max-pools.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """FID Inception-v3: NHWC ``[N, 299, 299, 3]`` in [-1, 1] → pool features ``[N, 2048]`` (float32)."""
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    conv = lambda *a, **k: BasicConv(*a, precision=p, **k)
    x = jnp.asarray(x, jnp.float32)
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)        # 149
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)                   # 147
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)        # 147
    x = _max_pool_3x3_s2(x)                                    # 73
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)                   # 73
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)                  # 71
    x = _max_pool_3x3_s2(x)                                    # 35
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)        # 256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)        # 288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)        # 288
    x = InceptionB(precision=p, name="Mixed_6a")(x)            # 17x17x768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)            # 8x8x1280
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)  # 2048
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)   # 2048
    return jnp.mean(x, axis=(1, 2))
