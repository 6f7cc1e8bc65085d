"""EDM teacher networks (Karras et al. 2022, NVlabs/edm ``training/networks.py``) in Flax Linen, NHWC.

- ``SongUNet``: DDPM++ (positional embedding, [1,1] resampling) and NCSN++ (Fourier embedding, [1,3,3,1]
  resampling, residual encoder with fused down-sampling) — the CIFAR-10 teachers.
- ``DhariwalUNet``: ADM (adaptive scale/shift, several heads, resample-only skips) — the ImageNet-64 teacher.
- ``EDMPrecond``: the preconditioning  ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels)``  (EDM eq. 7,
  Table 1), which is the denoiser DMD distills.

Parameters are float32 and named like the PyTorch modules (``model/enc_16x16_block0/conv0/kernel`` for
``model.enc.16x16_block0.conv0.weight``) so that ``dmd_jax.families.edm.convert`` is a renaming plus layout change.
``dtype`` sets the activation dtype (float32 or bfloat16); GroupNorm statistics, attention logits and softmax,
the sinusoidal / Fourier noise embeddings and the preconditioning stay float32. ``attention`` chooses the
attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see ``dmd_jax.models.attention``; EDM's attention is upcast, q·k
from float32 inputs, which 'auto' keeps on the XLA path).

The NCSN++ Fourier frequencies (a PyTorch buffer) live in the parameter tree as ``model/map_noise/freqs`` and
get no gradient; mask them out of weight decay when fine-tuning.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from dmd_jax.models.attention import check_implementation, dot_product_attention
from dmd_jax.models.layers import GroupNorm, dense
from dmd_jax.schedules import bcast, edm_precond_coefficients
from dmd_jax.sharding import constrain_batch

Dtype = Any

# Init-time record of the PyTorch buffers (``resample_filter``) that a state dict holds, in PyTorch layout. It is
# written only by ``Module.init`` (``sow`` is a no-op under ``apply``) and lets the converter check every buffer
# key against the same module definition that produced the parameters.
TORCH_BUFFERS = "torch_buffers"

_conv_init = nn.initializers.xavier_uniform()
_dense_init = nn.initializers.xavier_uniform()
# EDM's GroupNorm: min(32, C // 4) groups.
_GROUPS, _MIN_CHANNELS_PER_GROUP = 32, 4


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------------------------

def resample_filter_2d(f: Sequence[float]) -> np.ndarray:
  """The separable resampling filter ``outer(f, f) / sum(f)^2`` as a ``[k, k]`` float32 array."""
  f = np.asarray(f, np.float64)
  return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise(x, f2d: np.ndarray, *, stride: int = 1, padding: int = 0, lhs_dilation: int = 1):
  """Applies the same ``[k, k]`` filter to every channel of NHWC ``x`` (a grouped convolution)."""
  c = x.shape[-1]
  k = f2d.shape[0]
  w = jnp.broadcast_to(jnp.asarray(f2d, x.dtype)[:, :, None, None], (k, k, 1, c))
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c)


def _downsample(x, f2d, padding):
  return _depthwise(x, f2d, stride=2, padding=padding)


def _upsample(x, f2d, padding):
  """Transposed depthwise conv with ``4 f``, stride 2, PyTorch ``padding``: a dilated conv with the flipped
  filter and ``k - 1 - padding`` of padding."""
  k = f2d.shape[0]
  return _depthwise(x, (4 * f2d)[::-1, ::-1], lhs_dilation=2, padding=k - 1 - padding)


class Conv2d(nn.Module):
  """EDM's Conv2d: optional up/down resampling by a fixed filter around a ``kernel``×``kernel`` conv.

  ``kernel=0`` only resamples. Non-fused order: resample, then conv. ``fused_resample`` (NCSN++ ``aux_residual``)
  down: conv with padding ``k//2 + f_pad``, then the filter with stride 2 and no padding.
  """
  out_channels: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    x = x.astype(self.dtype)
    w = b = None
    if self.kernel:
      w = self.param("kernel", _conv_init, (self.kernel, self.kernel, cin, self.out_channels), jnp.float32)
      if self.use_bias:
        b = self.param("bias", nn.initializers.zeros, (self.out_channels,), jnp.float32)
    f = None
    if self.up or self.down:
      f = resample_filter_2d(self.resample_filter)
      self.sow(TORCH_BUFFERS, "resample_filter", jnp.asarray(f[None, None]),
               init_fn=lambda: None, reduce_fn=lambda _, new: new)
    w_pad = self.kernel // 2 if w is not None else 0
    f_pad = (f.shape[0] - 1) // 2 if f is not None else 0

    def conv(x, padding):
      return jax.lax.conv_general_dilated(
          x, w.astype(self.dtype), window_strides=(1, 1), padding=[(padding, padding)] * 2,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    if self.fused_resample and self.up and w is not None:
      x = _upsample(x, f, max(f_pad - w_pad, 0))
      x = conv(x, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = conv(x, w_pad + f_pad)
      x = _downsample(x, f, 0)
    else:
      if self.up:
        x = _upsample(x, f, f_pad)
      if self.down:
        x = _downsample(x, f, f_pad)
      if w is not None:
        x = conv(x, w_pad)
    if b is not None:
      x = x + b.astype(self.dtype)
    return x


def _group_norm(eps: float, dtype: Dtype, name: str) -> GroupNorm:
  return GroupNorm(_GROUPS, eps, dtype, min_channels_per_group=_MIN_CHANNELS_PER_GROUP, name=name)


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return dense(features, dtype, name, use_bias=use_bias, kernel_init=_dense_init)


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
  """``[cos(x f), sin(x f)]`` with ``f = (1/max_positions) ** (arange(C/2) / (C/2 - endpoint))``; float32."""
  half = num_channels // 2
  freqs = np.arange(half, dtype=np.float32) / np.float32(half - (1 if endpoint else 0))
  freqs = np.power(np.float32(1 / max_positions), freqs, dtype=np.float32)
  x = jnp.outer(x.astype(jnp.float32), jnp.asarray(freqs))
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """``[cos(2 pi x f), sin(2 pi x f)]`` with fixed random ``f ~ N(0, scale^2)`` (a buffer in PyTorch: no gradient)."""
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    freqs = self.param("freqs", lambda k, s: jax.random.normal(k, s, jnp.float32) * self.scale,
                       (self.num_channels // 2,))
    freqs = jax.lax.stop_gradient(freqs)
    x = jnp.outer(x.astype(jnp.float32), (2 * np.pi) * freqs)
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class UNetBlock(nn.Module):
  """Residual block with optional resampling and self-attention (EDM ``UNetBlock``).

  ``x = conv0(silu(norm0(x)))``; ``p = affine(emb)``; adaptive scale: ``x = silu(shift + norm1(x) (scale + 1))``,
  else ``x = silu(norm1(x + p))``; ``x = (conv1(dropout(x)) + skip(orig)) * skip_scale``; with attention
  ``x = (proj(attn(norm2(x))) + x) * skip_scale``.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  use_attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, emb):
    cin, cout, dt = x.shape[-1], self.out_channels, self.dtype
    num_heads = 0 if not self.use_attention else (
        self.num_heads if self.num_heads is not None else cout // self.channels_per_head)
    orig = x
    x = _group_norm(self.eps, dt, name="norm0")(x)
    x = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter, dtype=dt,
               name="conv0")(nn.silu(x))
    p = _dense(cout * (2 if self.adaptive_scale else 1), "affine", dt)(emb)[:, None, None, :].astype(dt)
    if self.adaptive_scale:
      scale, shift = jnp.split(p, 2, axis=-1)
      x = nn.silu(shift + _group_norm(self.eps, dt, name="norm1")(x) * (scale + 1))
    else:
      x = nn.silu(_group_norm(self.eps, dt, name="norm1")(x + p))
    x = nn.Dropout(self.dropout, deterministic=self.deterministic)(x)
    x = Conv2d(cout, 3, dtype=dt, name="conv1")(x)
    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      orig = Conv2d(cout, kernel, up=self.up, down=self.down, resample_filter=self.resample_filter, dtype=dt,
                    name="skip")(orig)
    x = constrain_batch((x + orig.astype(dt)) * self.skip_scale)
    if num_heads:
      n, h, w, _ = x.shape
      qkv = Conv2d(cout * 3, 1, dtype=dt, name="qkv")(_group_norm(self.eps, dt, name="norm2")(x))
      # PyTorch qkv output channel o = 3 * (head * d + c) + j, j in (q, k, v): interleaved, not thirds.
      qkv = constrain_batch(qkv.reshape(n, h * w, cout, 3))
      # EDM's AttentionOp: q·k and the softmax in float32.
      a = dot_product_attention(qkv[..., 0], qkv[..., 1], qkv[..., 2], num_heads, upcast=True,
                                impl=self.attention).reshape(n, h, w, cout)
      x = constrain_batch((Conv2d(cout, 1, dtype=dt, name="proj")(a) + x) * self.skip_scale)
    return x


def _block_cls(remat: bool):
  return nn.remat(UNetBlock) if remat else UNetBlock


def _augment_or_zeros(augment_labels, emb, augment_dim):
  if augment_labels is None:
    return jnp.zeros((emb.shape[0], augment_dim), jnp.float32)
  return jnp.asarray(augment_labels, jnp.float32)


def _label_dropout(module: nn.Module, labels, rate: float, train: bool):
  if train and rate:
    keep = jax.random.uniform(module.make_rng("dropout"), (labels.shape[0], 1)) >= rate
    labels = labels * keep.astype(labels.dtype)
  return labels


# ---------------------------------------------------------------------------------------------------------------
# SongUNet: DDPM++ and NCSN++ (Song et al. 2021), as configured by EDM.
# ---------------------------------------------------------------------------------------------------------------

def _decoder_level_entry(Block, block_kwargs, record, x, emb, cout: int, res: int, lowest: bool):
  """The first blocks of a decoder level, the same in SongUNet and DhariwalUNet: at the lowest resolution two
  blocks (attention in the first), elsewhere one upsampling block. Called inside the parent's compact
  ``__call__``, so the blocks are its submodules under these names."""
  if lowest:
    x = Block(cout, use_attention=True, **block_kwargs, name=f"dec_{res}x{res}_in0")(x, emb)
    record(f"dec.{res}x{res}_in0", x)
    x = Block(cout, **block_kwargs, name=f"dec_{res}x{res}_in1")(x, emb)
    record(f"dec.{res}x{res}_in1", x)
  else:
    x = Block(cout, up=True, **block_kwargs, name=f"dec_{res}x{res}_up")(x, emb)
    record(f"dec.{res}x{res}_up", x)
  return x


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net. ``__call__`` returns ``(F, encoder_output)``, both NHWC.

  Activations of every top-level block are sown into ``'intermediates'`` under their PyTorch names
  (``enc.16x16_block0``, ...) when that collection is mutable.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"  # 'positional' (DDPM++) | 'fourier' (NCSN++)
  channel_mult_noise: int = 1
  encoder_type: str = "standard"  # 'standard' | 'skip' | 'residual' (NCSN++)
  decoder_type: str = "standard"  # 'standard' | 'skip'
  resample_filter: Sequence[int] = (1, 1)
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train: bool = False):
    if self.embedding_type not in ("positional", "fourier"):
      raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
    if self.encoder_type not in ("standard", "skip", "residual"):
      raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {self.encoder_type!r}")
    if self.decoder_type not in ("standard", "skip"):
      raise ValueError(f"decoder_type must be 'standard' or 'skip', got {self.decoder_type!r}")
    dt = self.dtype
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    Block = _block_cls(self.remat)
    block_kwargs = dict(num_heads=1, dropout=self.dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
                        resample_filter=tuple(self.resample_filter), resample_proj=True, adaptive_scale=False,
                        deterministic=not train, dtype=dt, attention=self.attention)
    rf = tuple(self.resample_filter)
    record = lambda name, v: self.sow("intermediates", name, v)

    # Mapping.
    if self.embedding_type == "positional":
      emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
    else:
      emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
    emb = jnp.concatenate(jnp.split(emb, 2, axis=1)[::-1], axis=1)  # swap sin/cos
    if self.label_dim:
      labels = _label_dropout(self, class_labels.astype(jnp.float32), self.label_dropout, train)
      emb = emb + _dense(noise_channels, "map_label", dt)(labels * np.sqrt(self.label_dim))
    if self.augment_dim:  # map_augment(0) = 0 exactly (no bias): same as skipping it without augment labels
      emb = emb + _dense(noise_channels, "map_augment", dt, use_bias=False)(
          _augment_or_zeros(augment_labels, emb, self.augment_dim))
    emb = nn.silu(_dense(emb_channels, "map_layer0", dt)(emb))
    emb = nn.silu(_dense(emb_channels, "map_layer1", dt)(emb))

    # Encoder.
    x = x.astype(dt)
    skips = []
    aux = x
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cout = self.model_channels
        name = f"{res}x{res}_conv"
        x = Conv2d(cout, 3, dtype=dt, name=f"enc_{name}")(x)
        record(f"enc.{name}", x)
        skips.append(x)
      else:
        name = f"{res}x{res}_down"
        x = Block(cout, down=True, **block_kwargs, name=f"enc_{name}")(x, emb)
        record(f"enc.{name}", x)
        skips.append(x)
        if self.encoder_type == "skip":
          aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=rf, dtype=dt, name=f"enc_{res}x{res}_aux_down")(aux)
          t = Conv2d(cout, 1, dtype=dt, name=f"enc_{res}x{res}_aux_skip")(aux)
          record(f"enc.{res}x{res}_aux_skip", t)
          x = skips[-1] = x + t
        elif self.encoder_type == "residual":
          t = Conv2d(cout, 3, down=True, resample_filter=rf, fused_resample=True, dtype=dt,
                     name=f"enc_{res}x{res}_aux_residual")(aux)
          record(f"enc.{res}x{res}_aux_residual", t)
          x = skips[-1] = aux = (x + t) / np.sqrt(2)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        name = f"{res}x{res}_block{idx}"
        x = Block(cout, use_attention=res in self.attn_resolutions, **block_kwargs, name=f"enc_{name}")(x, emb)
        record(f"enc.{name}", x)
        skips.append(x)
    features = x

    # Decoder.
    aux = None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      x = _decoder_level_entry(Block, block_kwargs, record, x, emb, cout, res,
                               lowest=level == len(self.channel_mult) - 1)
      for idx in range(self.num_blocks + 1):
        cout = self.model_channels * mult
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = Block(cout, use_attention=attn, **block_kwargs, name=f"dec_{res}x{res}_block{idx}")(x, emb)
        record(f"dec.{res}x{res}_block{idx}", x)
      if self.decoder_type == "skip" or level == 0:
        if self.decoder_type == "skip" and level < len(self.channel_mult) - 1:
          aux = Conv2d(self.out_channels, 0, up=True, resample_filter=rf, dtype=dt,
                       name=f"dec_{res}x{res}_aux_up")(aux)
        t = _group_norm(1e-6, dt, name=f"dec_{res}x{res}_aux_norm")(x)
        record(f"dec.{res}x{res}_aux_norm", t)
        t = Conv2d(self.out_channels, 3, dtype=dt, name=f"dec_{res}x{res}_aux_conv")(nn.silu(t))
        record(f"dec.{res}x{res}_aux_conv", t)
        aux = t if aux is None else t + aux
    return aux, features


# ---------------------------------------------------------------------------------------------------------------
# DhariwalUNet: ADM (Dhariwal & Nichol 2021), as configured by EDM.
# ---------------------------------------------------------------------------------------------------------------

class DhariwalUNet(nn.Module):
  """ADM U-Net. ``__call__`` returns ``(F, encoder_output)``, both NHWC (encoder output: 768×8×8 at ImageNet-64)."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train: bool = False):
    dt = self.dtype
    emb_channels = self.model_channels * self.channel_mult_emb
    Block = _block_cls(self.remat)
    block_kwargs = dict(channels_per_head=64, dropout=self.dropout, deterministic=not train, dtype=dt,
                        attention=self.attention)
    record = lambda name, v: self.sow("intermediates", name, v)

    # Mapping.
    emb = positional_embedding(noise_labels, self.model_channels, endpoint=False)
    if self.augment_dim:  # map_augment(0) = 0 exactly (no bias): same as skipping it without augment labels
      emb = emb + _dense(self.model_channels, "map_augment", dt, use_bias=False)(
          _augment_or_zeros(augment_labels, emb, self.augment_dim))
    emb = nn.silu(_dense(emb_channels, "map_layer0", dt)(emb))
    emb = _dense(emb_channels, "map_layer1", dt)(emb)
    if self.label_dim:
      labels = _label_dropout(self, class_labels.astype(jnp.float32), self.label_dropout, train)
      emb = emb + _dense(emb_channels, "map_label", dt, use_bias=False)(labels)
    emb = nn.silu(emb)

    # Encoder.
    x = x.astype(dt)
    skips = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cout = self.model_channels * mult
        name = f"{res}x{res}_conv"
        x = Conv2d(cout, 3, dtype=dt, name=f"enc_{name}")(x)
      else:
        name = f"{res}x{res}_down"
        x = Block(cout, down=True, **block_kwargs, name=f"enc_{name}")(x, emb)
      record(f"enc.{name}", x)
      skips.append(x)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        name = f"{res}x{res}_block{idx}"
        x = Block(cout, use_attention=res in self.attn_resolutions, **block_kwargs, name=f"enc_{name}")(x, emb)
        record(f"enc.{name}", x)
        skips.append(x)
    features = x

    # Decoder.
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      x = _decoder_level_entry(Block, block_kwargs, record, x, emb, cout, res,
                               lowest=level == len(self.channel_mult) - 1)
      for idx in range(self.num_blocks + 1):
        cout = self.model_channels * mult
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = Block(cout, use_attention=res in self.attn_resolutions, **block_kwargs,
                  name=f"dec_{res}x{res}_block{idx}")(x, emb)
        record(f"dec.{res}x{res}_block{idx}", x)
    x = _group_norm(1e-5, dt, name="out_norm")(x)
    x = Conv2d(self.out_channels, 3, dtype=dt, name="out_conv")(nn.silu(x))
    return x, features


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning.
# ---------------------------------------------------------------------------------------------------------------

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class EDMPrecond(nn.Module):
  """EDM preconditioning (Karras et al. 2022, Table 1):

      D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels)          (float32)

  with the coefficients of ``dmd_jax.schedules.edm_precond_coefficients``. ``model_kwargs`` are the network
  kwargs of ``model_type`` (lists as tuples); ``sigma_min``/``sigma_max`` are recorded for samplers and not
  used here. Build one from an EDM ``init_kwargs`` dict with ``edm_module_from_kwargs``.
  """
  img_resolution: int
  img_channels: int
  label_dim: int = 0
  model_type: str = "DhariwalUNet"
  model_kwargs: Mapping[str, Any] = FrozenDict()
  sigma_data: float = 0.5
  sigma_min: float = 0.0
  sigma_max: float = float("inf")
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, augment_labels=None, train: bool = False,
               return_features: bool = False):
    """``x`` NHWC, ``sigma`` scalar or ``[N]``, ``class_labels`` one-hot ``[N, label_dim]`` (None: zeros) →
    ``D`` NHWC float32, or ``(D, encoder_features)`` with ``return_features``. ``train`` turns dropout on
    (needs a ``'dropout'`` rng)."""
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"unknown model_type {self.model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
    if self.label_dim:
      class_labels = (jnp.zeros((n, self.label_dim), jnp.float32) if class_labels is None
                      else jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim))
    else:
      class_labels = None
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, self.sigma_data)
    net = MODEL_TYPES[self.model_type](
        img_resolution=self.img_resolution, in_channels=self.img_channels, out_channels=self.img_channels,
        label_dim=self.label_dim, dtype=self.dtype, remat=self.remat, attention=self.attention,
        **dict(self.model_kwargs), name="model")
    f_x, features = net((bcast(c_in, x) * x).astype(self.dtype), c_noise, class_labels, augment_labels,
                        train=train)
    d_x = bcast(c_skip, x) * x + bcast(c_out, x) * f_x.astype(jnp.float32)
    return (d_x, features) if return_features else d_x


# ---------------------------------------------------------------------------------------------------------------
# From EDM's ``init_kwargs``.
# ---------------------------------------------------------------------------------------------------------------

_PRECOND_KEYS = {"img_resolution", "img_channels", "label_dim", "model_type", "use_fp16", "sigma_min",
                 "sigma_max", "sigma_data"}
_COMMON_NET_KEYS = {"augment_dim", "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                    "attn_resolutions", "dropout", "label_dropout"}
_NET_KEYS = {
    "SongUNet": _COMMON_NET_KEYS | {"embedding_type", "channel_mult_noise", "encoder_type", "decoder_type",
                                    "resample_filter"},
    "DhariwalUNet": _COMMON_NET_KEYS,
}


def _freeze(v):
  if isinstance(v, (list, tuple)):
    return tuple(_freeze(e) for e in v)
  return v


def edm_module_from_kwargs(init_kwargs: Mapping[str, Any], *, dtype: Dtype = jnp.float32,
                           remat: bool = False, attention: str = "auto") -> EDMPrecond:
  """Builds ``EDMPrecond`` from the ``init_kwargs`` an EDM network pickle records (``net.init_kwargs``).

  ``use_fp16`` is accepted and ignored (``dtype`` chooses the activation precision here); ``sigma_min`` /
  ``sigma_max`` / ``sigma_data`` are kept. Unknown keys raise ``ValueError`` naming them, as does an
  ``attention`` that is not 'auto', 'xla' or 'cudnn'.
  """
  check_implementation(attention)
  kw = dict(init_kwargs)
  model_type = kw.get("model_type", "DhariwalUNet")
  if model_type not in _NET_KEYS:
    raise ValueError(f"unknown EDM model_type {model_type!r}; expected one of {sorted(_NET_KEYS)}")
  for k in ("img_resolution", "img_channels"):
    if k not in kw:
      raise ValueError(f"EDM init_kwargs lack {k!r}")
  unknown = sorted(set(kw) - _PRECOND_KEYS - _NET_KEYS[model_type])
  if unknown:
    raise ValueError(f"unknown EDM init_kwargs for {model_type}: {', '.join(unknown)}")
  model_kwargs = {k: _freeze(v) for k, v in kw.items() if k in _NET_KEYS[model_type]}
  return EDMPrecond(
      img_resolution=int(kw["img_resolution"]), img_channels=int(kw["img_channels"]),
      label_dim=int(kw.get("label_dim", 0)), model_type=model_type, model_kwargs=FrozenDict(model_kwargs),
      sigma_data=float(kw.get("sigma_data", 0.5)), sigma_min=float(kw.get("sigma_min", 0.0)),
      sigma_max=float(kw.get("sigma_max", float("inf"))), dtype=dtype, remat=remat, attention=attention)


def init_inputs(module: EDMPrecond, batch: int = 1):
  """Dummy ``(x, sigma, class_labels)`` of the right shapes for ``module.init`` / ``jax.eval_shape``."""
  x = jnp.zeros((batch, module.img_resolution, module.img_resolution, module.img_channels), jnp.float32)
  labels = jnp.zeros((batch, module.label_dim), jnp.float32) if module.label_dim else None
  return x, jnp.ones((batch,), jnp.float32), labels
