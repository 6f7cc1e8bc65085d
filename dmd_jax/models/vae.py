"""The Stable Diffusion VAE (diffusers' ``AutoencoderKL``) in Flax Linen, NHWC.

    vae.apply({'params': p}, z, method='decode')   # unscaled latents [B,h,w,4] -> image [B,8h,8w,3]
    vae.apply({'params': p}, x, method='encode')   # image in [-1, 1] -> unscaled latent mean

Callers apply ``config.scaling_factor`` (0.18215 for SD 1.x): ``decode(z / scaling_factor)``,
``encode(x) * scaling_factor``. The decoder output is not clipped (nominally in [-1, 1]).
Parameter names mirror the diffusers state dict (see ``unet2d.py``). ``attention`` chooses the mid-block
attention's kernel ('auto' | 'xla' | 'cudnn' | 'splash', see ``dmd_jax.models.attention``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from dmd_jax.models.attention import dot_product_attention
from dmd_jax.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv, dense

Dtype = Any

_FIXED = dict(act_fn="silu")
_IGNORED = ("sample_size", "force_upcast", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """From a diffusers ``vae/config.json`` dict; ``ValueError`` (naming key and value) for what is not
    implemented."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    n = None
    for k, v in config.items():
      if k.startswith("_") or k in _IGNORED:
        continue
      if k in _FIXED:
        if v != _FIXED[k]:
          raise ValueError(f"unsupported VAE config: {k}={v!r} (this port implements only {_FIXED[k]!r})")
      elif k == "down_block_types":
        bad = [t for t in v if t != "DownEncoderBlock2D"]
        if bad:
          raise ValueError(f"unsupported VAE config: down_block_types contains {bad[0]!r}")
        n = len(v) if n is None else n
      elif k == "up_block_types":
        bad = [t for t in v if t != "UpDecoderBlock2D"]
        if bad:
          raise ValueError(f"unsupported VAE config: up_block_types contains {bad[0]!r}")
      elif k in names:
        kw[k] = tuple(v) if isinstance(v, list) else v
      else:
        raise ValueError(f"unsupported VAE config: unknown key {k}={v!r}")
    cfg = cls(**kw)
    nb = len(cfg.block_out_channels)
    for k in ("down_block_types", "up_block_types"):
      if k in config and len(config[k]) != nb:
        raise ValueError(f"unsupported VAE config: {k}={config[k]!r} does not match "
                         f"block_out_channels={cfg.block_out_channels!r}")
    if not isinstance(cfg.layers_per_block, int):
      raise ValueError(f"unsupported VAE config: layers_per_block={cfg.layers_per_block!r}")
    return cfg


class AttentionBlock(nn.Module):
  """The VAE mid-block attention: GroupNorm → single-head attention over ``H·W`` → + input."""
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    t = GroupNorm(self.groups, self.eps, self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    q = dense(c, self.dtype, "to_q")(t)
    k = dense(c, self.dtype, "to_k")(t)
    v = dense(c, self.dtype, "to_v")(t)
    out = dense(c, self.dtype, "to_out_0")(dot_product_attention(q, k, v, 1, impl=self.attention))
    return out.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
  """``UNetMidBlock2D`` without time embedding: resnet → (attention) → resnet."""
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = AttentionBlock(self.groups, 1e-6, self.dtype, self.attention, name="attentions_0")(x)
    return ResnetBlock2D(c, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(x)


class EncoderBlock(nn.Module):
  """``DownEncoderBlock2D``: resnets, then a stride-2 conv with right/bottom padding."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, 0, self.dtype, name="downsamplers_0")(x)
    return x


class DecoderBlock(nn.Module):
  """``UpDecoderBlock2D``: resnets, then 2× nearest upsampling and a 3×3 conv."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    x = conv(ch[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
    for i, c in enumerate(ch):
      x = EncoderBlock(c, cfg.layers_per_block, i < len(ch) - 1, g, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, self.attention, name="mid_block")(x)
    x = nn.silu(GroupNorm(g, 1e-6, self.dtype, name="conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    x = conv(ch[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, self.attention, name="mid_block")(x)
    for i, c in enumerate(ch):
      x = DecoderBlock(c, cfg.layers_per_block + 1, i < len(ch) - 1, g, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(g, 1e-6, self.dtype, name="conv_norm_out")(x))
    return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """``encode(x) -> latent mean`` and ``decode(z) -> image`` (both unscaled, float32 out). ``__call__`` runs
  both (``decode(encode(x))``), which is what ``init`` needs to create every parameter."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention)
    self.decoder = Decoder(cfg, self.dtype, self.attention)
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * cfg.latent_channels, 1, self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, 1, self.dtype)

  def encode(self, x):
    """Image ``[B, H, W, in_channels]`` → mean of the latent posterior ``[B, H/f, W/f, latent_channels]``."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return moments[..., :self.config.latent_channels].astype(jnp.float32)

  def decode(self, z):
    """Unscaled latents → image ``[B, H·f, W·f, out_channels]``."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x):
    return self.decode(self.encode(x))


def dummy_inputs(config: VAEConfig, batch: int = 1):
  s = 2 ** (len(config.block_out_channels) - 1)
  return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32),)
