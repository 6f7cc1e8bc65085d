"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``: SD 1.x / 2.x, and SDXL with its ``text_time``
added conditioning) in Flax Linen, NHWC.

Built from a diffusers ``unet/config.json`` through :class:`UNetConfig`; values this port does not implement
raise a ``ValueError`` that names the key and the value. Parameter names mirror the diffusers state dict with
list indices folded into the name (``down_blocks.0.resnets.1.conv1.weight`` ↔
``down_blocks_0/resnets_1/conv1/kernel``), so the converter (``dmd_jax.families.sd.convert``) only renames and
transposes.

Precision: parameters are float32; activations run in ``dtype`` (float32 or bfloat16). Group/LayerNorm
statistics, attention logits and softmax, and the timestep embedding are computed in float32; the returned
epsilon is float32.

``attention`` chooses the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see ``dmd_jax.models.attention``). The
norms, convs and resnet / resampling blocks are ``dmd_jax.models.layers`` (shared with ``vae.py``).

SDXL (``addition_embed_type="text_time"``): the call takes ``added_cond={'text_embeds': [B, P], 'time_ids': [B, 6]}``
(the pooled text embedding and the size / crop conditioning). Each time id gets the sinusoidal embedding of width
``addition_time_embed_dim``; ``[text_embeds, those 6 embeddings]`` (width ``projection_class_embeddings_input_dim``)
goes through ``add_embedding`` (linear, SiLU, linear) and is added to the timestep embedding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from dmd_jax.models.attention import dot_product_attention
from dmd_jax.sharding import constrain_batch
from dmd_jax.models.layers import (Downsample2D, GroupNorm, LayerNorm, ResnetBlock2D, Upsample2D, conv,
                                   dense)

Dtype = Any


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of diffusers' ``get_timestep_embedding``, in float32: ``[sin, cos]`` of
  ``t · exp(-ln(max_period) · i / (dim/2 - freq_shift))``, flipped to ``[cos, sin]`` if asked."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# ---------------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
  """diffusers ``Attention`` as used by the UNet's transformer blocks (no q/k/v bias).

  Takes ``[B, N, C]`` tokens; ``context`` (``[B, M, D]``) makes it cross-attention.
  """
  heads: int
  dim_head: int
  out_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    q, k, v = (constrain_batch(dense(inner, self.dtype, name, use_bias=False)(y))
               for name, y in (("to_q", x), ("to_k", context), ("to_v", context)))
    out = constrain_batch(dot_product_attention(q, k, v, self.heads, upcast=self.upcast, impl=self.attention))
    return constrain_batch(dense(self.out_dim, self.dtype, "to_out_0")(out))


class GEGLU(nn.Module):
  """``proj(x) = [h, gate]``; ``h · gelu(gate)`` (exact erf GELU)."""
  dim_out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(constrain_batch(dense(2 * self.dim_out, self.dtype, "proj")(x)), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
    return dense(self.dim, self.dtype, "net_2")(x)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention on the text tokens, GEGLU feed-forward; all residual."""
  dim: int
  heads: int
  dim_head: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    kw = dict(heads=self.heads, dim_head=self.dim_head, out_dim=self.dim, upcast=self.upcast, dtype=self.dtype,
              attention=self.attention)
    x = Attention(**kw, name="attn1")(LayerNorm(1e-5, self.dtype, name="norm1")(x)) + x
    x = Attention(**kw, name="attn2")(LayerNorm(1e-5, self.dtype, name="norm2")(x), context) + x
    x = FeedForward(self.dim, dtype=self.dtype, name="ff")(LayerNorm(1e-5, self.dtype, name="norm3")(x)) + x
    return constrain_batch(x)


class Transformer2DModel(nn.Module):
  """GroupNorm (eps 1e-6) → proj_in (1×1 conv, or linear when ``use_linear_projection``) → transformer
  blocks on the ``H·W`` tokens → proj_out → + input."""
  heads: int
  dim_head: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    x = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
    if self.use_linear_projection:
      x = dense(inner, self.dtype, "proj_in")(x.reshape(b, h * w, c))
    else:
      x = conv(inner, 1, self.dtype, "proj_in")(x).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      x = BasicTransformerBlock(inner, self.heads, self.dim_head, self.upcast, self.dtype, self.attention,
                                name=f"transformer_blocks_{i}")(x, context)
    if self.use_linear_projection:
      x = dense(c, self.dtype, "proj_out")(x).reshape(b, h, w, c)
    else:
      x = conv(c, 1, self.dtype, "proj_out")(x.reshape(b, h, w, inner))
    return constrain_batch(x + residual)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------

# Every UNet2DConditionModel argument this port implements only at one value: {key: allowed value}.
_FIXED = dict(
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False, act_fn="silu", dropout=0.0,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    num_attention_heads=None, dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    attention_type="default", class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None)
# The added conditionings (addition_embed_type) this port implements: None (SD 1.x / 2.x) and SDXL's.
_ADDITIONS = (None, "text_time")
# Arguments that do not change the network (or only matter with features rejected above).
_IGNORED = ("sample_size", "addition_embed_type_num_heads")
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(cfg: Mapping[str, Any], key: str, n: int, kind=int) -> tuple:
  v = cfg[key]
  if isinstance(v, (list, tuple)):
    if len(v) != n or not all(isinstance(e, kind) and not isinstance(e, bool) for e in v):
      raise ValueError(f"unsupported UNet config: {key}={v!r} (expected one {kind.__name__} or {n} of them)")
    return tuple(v)
  if not isinstance(v, kind) or isinstance(v, bool):
    raise ValueError(f"unsupported UNet config: {key}={v!r}")
  return (v,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The UNet's architecture, normalised from a diffusers config: per-block values are tuples over the down
  blocks (the up blocks use them reversed). ``num_heads`` is diffusers' ``attention_head_dim`` (which, for
  historical reasons, holds the number of heads; the head width is ``channels // num_heads``).
  ``addition_embed_type`` is None or ``'text_time'`` (SDXL); with ``'text_time'``, ``addition_time_embed_dim`` and
  ``projection_class_embeddings_input_dim`` are set (both None otherwise)."""
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: tuple = (2, 2, 2, 2)
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: tuple = (768,) * 4
  transformer_layers_per_block: tuple = (1, 1, 1, 1)
  num_heads: tuple = (8, 8, 8, 8)
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Builds the config from a diffusers ``config.json`` dict, raising ``ValueError`` for what is not
    implemented (naming the key and value)."""
    defaults = dict(
        in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=cls.down_block_types, up_block_types=cls.up_block_types,
        block_out_channels=cls.block_out_channels, layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
        transformer_layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
        upcast_attention=False, time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3,
        addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    cfg = dict(defaults)
    for k, v in config.items():
      if k.startswith("_") or k in _IGNORED:
        continue
      if k in _FIXED:
        allowed = _FIXED[k]
        same = (v == allowed) or (allowed is False and v is None) or (allowed is None and v is False)
        if isinstance(v, (list, tuple)):  # e.g. only_cross_attention given per block
          same = all(e == allowed for e in v)
        if not same:
          raise ValueError(f"unsupported UNet config: {k}={v!r} (this port implements only {allowed!r})")
        continue
      if k not in defaults:
        raise ValueError(f"unsupported UNet config: unknown key {k}={v!r}")
      cfg[k] = v
    down = tuple(cfg["down_block_types"])
    up = tuple(cfg["up_block_types"])
    down = tuple(t[7:] if t.startswith("UNetRes") else t for t in down)
    up = tuple(t[7:] if t.startswith("UNetRes") else t for t in up)
    for t in down:
      if t not in _DOWN:
        raise ValueError(f"unsupported UNet config: down_block_types contains {t!r} (supported: {_DOWN})")
    for t in up:
      if t not in _UP:
        raise ValueError(f"unsupported UNet config: up_block_types contains {t!r} (supported: {_UP})")
    n = len(down)
    if len(up) != n or len(cfg["block_out_channels"]) != n:
      raise ValueError(f"unsupported UNet config: down_block_types={down}, up_block_types={up} and "
                       f"block_out_channels={cfg['block_out_channels']} differ in length")
    if cfg["norm_num_groups"] is None:
      raise ValueError("unsupported UNet config: norm_num_groups=None")
    tlpb = cfg["transformer_layers_per_block"]
    if isinstance(tlpb, (list, tuple)) and any(isinstance(e, (list, tuple)) for e in tlpb):
      raise ValueError(f"unsupported UNet config: transformer_layers_per_block={tlpb!r} (nested lists)")
    for k in ("conv_in_kernel", "conv_out_kernel"):
      if cfg[k] % 2 != 1:
        raise ValueError(f"unsupported UNet config: {k}={cfg[k]!r} (odd sizes only)")
    addition = cfg["addition_embed_type"]
    if addition not in _ADDITIONS:
      raise ValueError(f"unsupported UNet config: addition_embed_type={addition!r} (this port implements "
                       f"{' and '.join(map(repr, _ADDITIONS))})")
    add_dims = dict(addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    if addition == "text_time":  # (diffusers reads these two keys only for this addition type)
      for k in add_dims:
        v = cfg[k]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
          raise ValueError(f"unsupported UNet config: addition_embed_type='text_time' needs a positive int {k} "
                           f"(got {k}={v!r})")
        add_dims[k] = v
    return cls(
        in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        center_input_sample=bool(cfg["center_input_sample"]), flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
        freq_shift=float(cfg["freq_shift"]), down_block_types=down, up_block_types=up,
        block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
        layers_per_block=_per_block(cfg, "layers_per_block", n),
        downsample_padding=int(cfg["downsample_padding"]),
        mid_block_scale_factor=float(cfg["mid_block_scale_factor"]),
        norm_num_groups=int(cfg["norm_num_groups"]), norm_eps=float(cfg["norm_eps"]),
        cross_attention_dim=_per_block(cfg, "cross_attention_dim", n),
        transformer_layers_per_block=_per_block(cfg, "transformer_layers_per_block", n),
        num_heads=_per_block(cfg, "attention_head_dim", n),
        use_linear_projection=bool(cfg["use_linear_projection"]),
        upcast_attention=bool(cfg["upcast_attention"]),
        time_embedding_dim=None if cfg["time_embedding_dim"] is None else int(cfg["time_embedding_dim"]),
        conv_in_kernel=int(cfg["conv_in_kernel"]), conv_out_kernel=int(cfg["conv_out_kernel"]),
        addition_embed_type=addition, **add_dims)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------

class DownBlock(nn.Module):
  """``DownBlock2D`` / ``CrossAttnDownBlock2D``: resnets (each followed by a transformer when
  ``cross_attn``), then an optional stride-2 conv. Returns the output and the skip features."""
  out_channels: int
  num_layers: int
  cross_attn: bool
  heads: int
  transformer_layers: int
  add_downsample: bool
  groups: int
  eps: float
  use_linear_projection: bool
  upcast: bool
  downsample_padding: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
      if self.cross_attn:
        x = Transformer2DModel(self.heads, self.out_channels // self.heads, self.transformer_layers,
                               self.groups, self.use_linear_projection, self.upcast, self.dtype,
                               self.attention, name=f"attentions_{i}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """``UpBlock2D`` / ``CrossAttnUpBlock2D``: each resnet takes ``concat([x, skip])`` (skips popped from the
  end), then an optional nearest upsampling to ``upsample_size`` and a 3×3 conv."""
  out_channels: int
  num_layers: int
  cross_attn: bool
  heads: int
  transformer_layers: int
  upsample_size: Optional[tuple[int, int]]
  groups: int
  eps: float
  use_linear_projection: bool
  upcast: bool
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, skips, temb, context):
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
      if self.cross_attn:
        x = Transformer2DModel(self.heads, self.out_channels // self.heads, self.transformer_layers,
                               self.groups, self.use_linear_projection, self.upcast, self.dtype,
                               self.attention, name=f"attentions_{i}")(x, context)
    if self.upsample_size is not None:
      x = Upsample2D(self.out_channels, self.upsample_size, self.dtype, name="upsamplers_0")(x)
    return x


class MidBlockCrossAttn(nn.Module):
  """``UNetMidBlock2DCrossAttn``: resnet → transformer → resnet."""
  heads: int
  transformer_layers: int
  groups: int
  eps: float
  output_scale_factor: float
  use_linear_projection: bool
  upcast: bool
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, context):
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, self.dtype, name="resnets_0")(x, temb)
    x = Transformer2DModel(self.heads, c // self.heads, self.transformer_layers, self.groups,
                           self.use_linear_projection, self.upcast, self.dtype, self.attention,
                           name="attentions_0")(x, context)
    return ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, self.dtype, name="resnets_1")(x, temb)


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
  """``linear_2(silu(linear_1(t_emb)))``."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return dense(self.dim, self.dtype, "linear_2")(nn.silu(dense(self.dim, self.dtype, "linear_1")(x)))


def text_time_input(config: UNetConfig, added_cond: Optional[Mapping[str, Any]], batch: int):
  """The input of SDXL's ``add_embedding``, float32 ``[B, projection_class_embeddings_input_dim]``:
  ``[text_embeds, emb(time_ids[:, 0]), ..., emb(time_ids[:, -1])]`` with ``emb`` the sinusoidal embedding of
  width ``addition_time_embed_dim`` (the UNet's ``flip_sin_to_cos`` / ``freq_shift``). ``text_embeds`` ``[B, P]``
  and ``time_ids`` ``[B, n]`` may also be given once (``[P]`` / ``[n]`` or a batch of 1) for the whole batch."""
  if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
    got = None if added_cond is None else sorted(added_cond)
    raise ValueError("this UNet has addition_embed_type='text_time' (SDXL) and needs "
                     f"added_cond={{'text_embeds': [B, P], 'time_ids': [B, 6]}} (got {got})")
  text = jnp.asarray(added_cond["text_embeds"], jnp.float32)
  ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
  text = jnp.broadcast_to(text, (batch, text.shape[-1]))
  ids = jnp.broadcast_to(ids, (batch, ids.shape[-1]))
  d = config.addition_time_embed_dim
  width = text.shape[-1] + ids.shape[-1] * d
  if width != config.projection_class_embeddings_input_dim:
    raise ValueError(f"added_cond: text_embeds {text.shape[-1]} wide + {ids.shape[-1]} time ids x "
                     f"addition_time_embed_dim {d} = {width}, but projection_class_embeddings_input_dim is "
                     f"{config.projection_class_embeddings_input_dim}")
  emb = timestep_embedding(ids.reshape(-1), d, config.flip_sin_to_cos, config.freq_shift).reshape(batch, -1)
  return jnp.concatenate([text, emb], axis=-1)


class UNet2DConditionModel(nn.Module):
  """``apply({'params': p}, latents [B,H,W,C], timesteps [B] or scalar, text [B,L,D]) -> eps [B,H,W,C]``
  (float32). With ``return_mid_features=True`` returns ``(eps, mid)``, ``mid`` the mid-block output
  ``[B, H/2^k, W/2^k, C_last]`` in ``dtype`` (the bottleneck DMD2's GAN head reads).

  ``added_cond`` is SDXL's added conditioning, ``{'text_embeds': [B, P], 'time_ids': [B, 6]}`` (see
  :func:`text_time_input`): required by a ``text_time`` UNet, refused by the others (a ``ValueError`` either way).

  ``remat`` rematerialises each down/mid/up block in the backward pass (gradient checkpointing);
  ``attention`` is the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see ``dmd_jax.models.attention``).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond: Optional[Mapping[str, Any]] = None,
               return_mid_features: bool = False):
    cfg = self.config
    wrap = nn.remat if self.remat else (lambda m: m)
    ch = cfg.block_out_channels
    n = len(ch)
    groups, eps = cfg.norm_num_groups, cfg.norm_eps

    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    b = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    temb = timestep_embedding(t, ch[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
    temb_dim = cfg.time_embedding_dim or 4 * ch[0]
    temb = TimestepEmbedding(temb_dim, self.dtype, name="time_embedding")(temb)
    if cfg.addition_embed_type == "text_time":
      add = text_time_input(cfg, added_cond, b).astype(self.dtype)
      temb = temb + TimestepEmbedding(temb_dim, self.dtype, name="add_embedding")(add)
    elif added_cond is not None:
      raise ValueError("added_cond was given to a UNet without addition_embed_type (only SDXL's 'text_time' UNets "
                       "take it)")
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)

    x = conv(ch[0], cfg.conv_in_kernel, self.dtype, "conv_in")(sample.astype(self.dtype))
    skips = [x]
    for i, kind in enumerate(cfg.down_block_types):
      x, res = wrap(DownBlock)(
          ch[i], cfg.layers_per_block[i], kind == "CrossAttnDownBlock2D", cfg.num_heads[i],
          cfg.transformer_layers_per_block[i], i < n - 1, groups, eps, cfg.use_linear_projection,
          cfg.upcast_attention, cfg.downsample_padding, self.dtype, self.attention,
          name=f"down_blocks_{i}")(x, temb, context)
      skips.extend(res)

    x = wrap(MidBlockCrossAttn)(
        cfg.num_heads[-1], cfg.transformer_layers_per_block[-1], groups, eps, cfg.mid_block_scale_factor,
        cfg.use_linear_projection, cfg.upcast_attention, self.dtype, self.attention,
        name="mid_block")(x, temb, context)
    mid = x

    rev = lambda v: tuple(reversed(v))
    r_ch, r_layers, r_heads, r_tl = rev(ch), rev(cfg.layers_per_block), rev(cfg.num_heads), rev(
        cfg.transformer_layers_per_block)
    for i, kind in enumerate(cfg.up_block_types):
      k = r_layers[i] + 1
      res, skips = skips[-k:], skips[:-k]
      size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = wrap(UpBlock)(
          r_ch[i], k, kind == "CrossAttnUpBlock2D", r_heads[i], r_tl[i], size, groups, eps,
          cfg.use_linear_projection, cfg.upcast_attention, self.dtype, self.attention, name=f"up_blocks_{i}")(
              x, tuple(res), temb, context)

    x = nn.silu(GroupNorm(groups, eps, self.dtype, name="conv_norm_out")(x))
    eps_out = conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x).astype(jnp.float32)
    if return_mid_features:
      return eps_out, mid
    return eps_out


def dummy_inputs(config: UNetConfig, batch: int = 1):
  """Smallest inputs that trace the whole network (for ``init`` / ``eval_shape``): ``(latents, timesteps, text)``,
  plus ``added_cond`` for a ``text_time`` UNet (6 time ids as SDXL's base model has, 1 if the width leaves no room
  for 6; the rest of ``projection_class_embeddings_input_dim`` as text_embeds: only the sum sets the shapes)."""
  s = 2 ** (len(config.block_out_channels) - 1)
  inputs = (jnp.zeros((batch, s, s, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, config.cross_attention_dim[0]), jnp.float32))
  if config.addition_embed_type == "text_time":
    width, d = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
    n = 6 if width > 6 * d else 1
    inputs += ({"text_embeds": jnp.zeros((batch, width - n * d), jnp.float32),
                "time_ids": jnp.zeros((batch, n), jnp.float32)},)
  return inputs
