"""Layers shared by the networks of ``dmd_jax.models``, in Flax Linen, NHWC.

- :func:`conv`, :func:`dense`: ``nn.Conv`` / ``nn.Dense`` with float32 parameters and activations in
  ``dtype`` (UNet2D, VAE, CLIP, EDM's dense layers, LPIPS).
- :class:`GroupNorm`, :class:`LayerNorm`: PyTorch's (affine) norms, statistics in float32, the epsilon passed
  explicitly as PyTorch's module has it (UNet2D, VAE, CLIP, EDM).
- :class:`ResnetBlock2D`, :class:`Downsample2D`, :class:`Upsample2D`: diffusers' resnet and resampling blocks
  (UNet2D and VAE).

Attention is ``dmd_jax.models.attention``. Parameter names are those the converters expect (``kernel``,
``bias``, ``scale``) and must not change.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dmd_jax.sharding import constrain_batch

Dtype = Any


def conv(features: int, kernel: int, dtype: Dtype, name: Optional[str] = None, stride: int = 1,
         padding: Optional[int] = None, use_bias: bool = True, precision: Any = None) -> nn.Conv:
  """A ``kernel``×``kernel`` conv; ``padding`` defaults to ``(kernel - 1) // 2`` on every side."""
  pad = (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, precision=precision, name=name)


def dense(features: int, dtype: Dtype, name: Optional[str] = None, use_bias: bool = True,
          kernel_init=nn.linear.default_kernel_init) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                  name=name)


class GroupNorm(nn.Module):
  """``torch.nn.GroupNorm`` (affine): statistics in float32 with the two-pass variance, output in ``dtype``.

  ``min_channels_per_group`` (EDM's GroupNorm) lowers the group count to ``C // min_channels_per_group``
  when that is smaller than ``num_groups``.
  """
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  min_channels_per_group: Optional[int] = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = self.num_groups
    if self.min_channels_per_group:
      groups = min(groups, c // self.min_channels_per_group)
    if groups < 1 or c % groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    g = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = g.mean(axes, keepdims=True)
    var = jnp.square(g - mean).mean(axes, keepdims=True)
    g = (g - mean) / jnp.sqrt(var + self.epsilon)
    return (g.reshape(x.shape) * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """``torch.nn.LayerNorm`` over the last axis: statistics in float32, output in ``dtype``."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) / jnp.sqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------
# diffusers' resnet and resampling blocks (UNet2D and VAE)
# ---------------------------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
  """``x + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))``, 1×1 shortcut when channels change."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x))
    h = constrain_batch(conv(self.out_channels, 3, self.dtype, "conv1")(h))
    if temb is not None:
      t = dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return constrain_batch(out)


class Downsample2D(nn.Module):
  """3×3 conv with stride 2; ``padding == 0`` pads right/bottom by one first (the VAE encoder's form)."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def nearest_resize(x, size: Sequence[int]):
  """``F.interpolate(mode='nearest')`` on NHWC: source index ``floor(dst · in / out)``."""
  h, w = x.shape[1:3]
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  iy = jnp.floor(jnp.arange(oh, dtype=jnp.float32) * jnp.float32(h / oh)).astype(jnp.int32)
  ix = jnp.floor(jnp.arange(ow, dtype=jnp.float32) * jnp.float32(w / ow)).astype(jnp.int32)
  return x[:, jnp.minimum(iy, h - 1)][:, :, jnp.minimum(ix, w - 1)]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2× or to ``size``) followed by a 3×3 conv."""
  channels: int
  size: Optional[tuple[int, int]] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    size = self.size if self.size is not None else (2 * x.shape[1], 2 * x.shape[2])
    x = nearest_resize(x, size)
    return conv(self.channels, 3, self.dtype, "conv")(x)
