"""CLIP transformers in Flax Linen: the text transformer (``transformers.CLIPTextModel``'s ``text_model``, the
Stable Diffusion text encoder), the text transformer with its projection (``transformers.CLIPTextModelWithProjection``,
SDXL's second text encoder) and, for CLIP score, the vision tower and the two-tower :class:`CLIPModel`.

    text = CLIPTextTransformer(CLIPTextConfig.from_hf(json.load(open('text_encoder/config.json'))))
    hidden = text.apply({'params': p}, input_ids)                       # last_hidden_state [B, L, D]
    hidden, pooled = text.apply({'params': p}, input_ids, return_pooled=True)
    penultimate = text.apply({'params': p}, input_ids, hidden_layer=-2)  # transformers' hidden_states[-2]

    text2 = CLIPTextModelWithProjection(CLIPTextConfig.from_hf(json.load(open('text_encoder_2/config.json'))))
    penultimate, text_embeds = text2.apply({'params': q}, input_ids, hidden_layer=-2)   # [B, L, D], [B, P]

    clip = CLIPModel(CLIPConfig.from_hf(json.load(open('clip/config.json'))))   # a transformers CLIPModel
    img = clip.apply({'params': q}, pixels_nhwc, method='get_image_features')
    txt = clip.apply({'params': q}, input_ids, method='get_text_features')

Stable Diffusion 1.x conditions on ``last_hidden_state`` (after the final LayerNorm); SDXL on both encoders'
penultimate hidden states (``hidden_layer=-2``: the output of the second-to-last encoder layer, without the final
LayerNorm) and on the second encoder's ``text_embeds`` (``text_projection`` of the pooled output). The pre-LN encoder
(:class:`CLIPEncoder`) takes an optional additive mask; the vision tower (patch embedding + class token +
``pre_layrnorm`` + the same encoder + ``post_layernorm``) reuses it unmasked. Parameter names mirror
the PyTorch state dict (the text transformer's without the ``text_model.`` prefix:
``encoder.layers.3.mlp.fc1.weight`` ↔ ``encoder/layers_3/mlp/fc1/kernel``; :class:`CLIPTextModelWithProjection`'s
with it, ``text_model/encoder/layers_3/mlp/fc1/kernel``, and ``text_projection/kernel``). LayerNorm statistics and the
softmax are float32. ``attention`` chooses the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see
``dmd_jax.models.attention``; the text tower's causal mask always takes the XLA path).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.models.attention import dot_product_attention
from dmd_jax.models.layers import LayerNorm, conv, dense

Dtype = Any

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 768

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers ``text_encoder/config.json`` dict (other keys — dropout, init, token ids other
    than eos — do not change inference). ``ValueError`` for an activation this port lacks."""
    if config.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"unsupported text encoder config: model_type={config['model_type']!r}")
    kw = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    if kw.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
      raise ValueError(f"unsupported text encoder config: hidden_act={kw['hidden_act']!r} "
                       f"(supported: {sorted(_ACTIVATIONS)})")
    return cls(**kw)


class CLIPAttention(nn.Module):
  heads: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None):
    c = x.shape[-1]
    q = dense(c, self.dtype, "q_proj")(x)
    k = dense(c, self.dtype, "k_proj")(x)
    v = dense(c, self.dtype, "v_proj")(x)
    out = dot_product_attention(q, k, v, self.heads, mask=mask, impl=self.attention)
    return dense(c, self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, self.dtype, "fc1")(x))
    return dense(x.shape[-1], self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None):
    x = x + CLIPAttention(self.heads, self.dtype, self.attention, name="self_attn")(
        LayerNorm(self.eps, self.dtype, name="layer_norm1")(x), mask)
    x = x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
        LayerNorm(self.eps, self.dtype, name="layer_norm2")(x))
    return x


class CLIPEncoder(nn.Module):
  """The pre-LayerNorm transformer shared by the text and vision towers; ``mask`` is additive
  (``[L, L]`` or ``[B, 1, L, L]``, 0 to keep and -inf to drop). ``return_hidden_states`` also returns the
  ``num_layers + 1`` states transformers' ``hidden_states`` holds (the input, then each layer's output)."""
  num_layers: int
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None, return_hidden_states: bool = False):
    states = [x]
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype,
                           self.attention, name=f"layers_{i}")(x, mask)
      states.append(x)
    return (x, tuple(states)) if return_hidden_states else x


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  max_positions: int
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    n = input_ids.shape[-1]
    if n > self.max_positions:
      raise ValueError(f"{n} tokens exceed max_position_embeddings={self.max_positions}")
    tok = nn.Embed(self.vocab_size, self.hidden_size, param_dtype=jnp.float32, name="token_embedding")
    pos = nn.Embed(self.max_positions, self.hidden_size, param_dtype=jnp.float32, name="position_embedding")
    return (tok(input_ids) + pos(jnp.arange(n))[None]).astype(self.dtype)


class CLIPTextTransformer(nn.Module):
  """``input_ids [B, L]`` → ``last_hidden_state [B, L, D]`` (float32): token + position embeddings, causal
  pre-LN transformer, final LayerNorm.

  ``hidden_layer`` (an int) returns transformers' ``hidden_states[hidden_layer]`` instead, float32: index 0 is the
  embeddings, ``i`` the output of encoder layer ``i`` (1-based), negative indices count from the end (``-1`` the last
  layer's output, ``-2`` SDXL's penultimate state); these states are not final-LayerNormed. ``return_pooled``
  adds the final-LayerNormed last layer's state at the first end-of-text token (the last-id argmax for legacy
  configs with ``eos_token_id == 2``, as transformers does), whatever ``hidden_layer`` is."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, input_ids, return_pooled: bool = False, hidden_layer: Optional[int] = None):
    cfg = self.config
    n_states = cfg.num_hidden_layers + 1
    if hidden_layer is not None and not -n_states <= hidden_layer < n_states:
      raise ValueError(f"hidden_layer={hidden_layer} is out of range: the text encoder has {n_states} hidden states "
                       f"(the embeddings and {cfg.num_hidden_layers} layers)")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    n = input_ids.shape[-1]
    x = CLIPTextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, self.dtype,
                           name="embeddings")(input_ids)
    causal = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)
    x, states = CLIPEncoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
                            cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.attention,
                            name="encoder")(x, causal, return_hidden_states=True)
    x = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="final_layer_norm")(x)
    out = x if hidden_layer is None else states[hidden_layer].astype(jnp.float32)
    if not return_pooled:
      return out
    if cfg.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:
      idx = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    return out, x[jnp.arange(x.shape[0]), idx]


class CLIPTextModelWithProjection(nn.Module):
  """transformers' ``CLIPTextModelWithProjection`` (SDXL's second text encoder, OpenCLIP ViT-bigG/14):
  ``input_ids [B, L]`` → ``(hidden [B, L, D], text_embeds [B, projection_dim])``, both float32. ``hidden`` is
  :class:`CLIPTextTransformer`'s output for ``hidden_layer`` (``last_hidden_state`` by default, ``-2`` for
  SDXL's penultimate state); ``text_embeds`` is ``text_projection`` (linear, no bias) of the pooled output.
  Parameters: ``text_model/...`` (the transformer) and ``text_projection/kernel``, as the PyTorch keys."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, input_ids, hidden_layer: Optional[int] = None):
    hidden, pooled = CLIPTextTransformer(self.config, self.dtype, self.attention, name="text_model")(
        input_ids, return_pooled=True, hidden_layer=hidden_layer)
    text_embeds = dense(self.config.projection_dim, self.dtype, "text_projection", use_bias=False)(pooled)
    return hidden, text_embeds.astype(jnp.float32)


def dummy_inputs(config: CLIPTextConfig, batch: int = 1):
  return (jnp.zeros((batch, 1), jnp.int32),)


# ---------------------------------------------------------------------------------------------------------
# The vision tower and the two-tower CLIPModel (CLIP score)
# ---------------------------------------------------------------------------------------------------------

# transformers' defaults, used for keys a saved CLIPModel config.json leaves out.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, eos_token_id=49407, projection_dim=512)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a transformers ``CLIPVisionConfig`` dict (missing keys take transformers' defaults)."""
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
      raise ValueError(f"unsupported vision config: model_type={config['model_type']!r}")
    kw = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    for key in ("image_size", "patch_size"):
      v = kw.get(key)
      if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
          raise ValueError(f"unsupported vision config: non-square {key}={v}")
        kw[key] = int(v[0])
    if kw.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
      raise ValueError(f"unsupported vision config: hidden_act={kw['hidden_act']!r} "
                       f"(supported: {sorted(_ACTIVATIONS)})")
    cfg = cls(**kw)
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"unsupported vision config: image_size {cfg.image_size} is not a multiple of "
                       f"patch_size {cfg.patch_size}")
    return cfg

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 768

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "CLIPConfig":
    """From a transformers ``CLIPModel`` ``config.json`` dict (``model_type`` ``"clip"``, with
    ``text_config`` and ``vision_config``)."""
    if config.get("model_type", "clip") != "clip":
      raise ValueError(f"unsupported CLIP config: model_type={config['model_type']!r} (expected 'clip', a "
                       "transformers CLIPModel)")
    # Old hub configs (transformers < 4.20) may carry the sub-configs as `*_config_dict` only.
    text = config.get("text_config") or config.get("text_config_dict") or {}
    vision = config.get("vision_config") or config.get("vision_config_dict") or {}
    return cls(text=CLIPTextConfig.from_hf(dict(_HF_TEXT_DEFAULTS, **text)),
               vision=CLIPVisionConfig.from_hf(vision),
               projection_dim=int(config.get("projection_dim", 512)))


class CLIPVisionEmbeddings(nn.Module):
  """Patch embedding (a stride-``p`` conv without bias) with the class token in front, plus positions."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    b, h, w, _ = pixel_values.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"CLIP vision tower expects {cfg.image_size}x{cfg.image_size} images, got {h}x{w}")
    d = cfg.hidden_size
    class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (d,), jnp.float32)
    p = cfg.patch_size
    x = conv(d, p, self.dtype, "patch_embedding", stride=p, padding=0, use_bias=False)(
        pixel_values.astype(self.dtype))
    x = x.reshape(b, -1, d)                              # row-major patches, as torch's flatten(2)
    cls = jnp.broadcast_to(class_embedding.astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    pos = nn.Embed(cfg.num_patches + 1, d, param_dtype=jnp.float32, name="position_embedding")
    return (x + pos(jnp.arange(cfg.num_patches + 1))[None]).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
  """``pixel_values [B, S, S, C]`` (NHWC, normalised) → ``(last_hidden_state, pooled)``: embeddings,
  ``pre_layrnorm`` (transformers' spelling), the shared pre-LN encoder without a mask, ``post_layernorm`` of
  the class token (the pooled output)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.config
    x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
    x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="pre_layrnorm")(x)
    x = CLIPEncoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                    cfg.layer_norm_eps, self.dtype, self.attention, name="encoder")(x)
    pooled = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="post_layernorm")(x[:, 0])
    return x, pooled


class CLIPModel(nn.Module):
  """transformers' ``CLIPModel`` for embedding: both towers and the two projections (no bias).

      model = CLIPModel(CLIPConfig.from_hf(json.load(open('config.json'))))
      img = model.apply({'params': p}, pixel_values_nhwc, method='get_image_features')   # [B, P] float32
      txt = model.apply({'params': p}, input_ids, method='get_text_features')            # [B, P] float32
      img, txt, logits = model.apply({'params': p}, input_ids, pixel_values_nhwc)        # logits [B_img, B_txt]

  Features are unnormalised (as transformers returns them). Parameter paths are the PyTorch keys
  (``vision_model/encoder/layers_3/mlp/fc1/kernel`` ↔ ``vision_model.encoder.layers.3.mlp.fc1.weight``);
  ``logit_scale`` is kept for completeness (only ``__call__``'s logits use it).
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextTransformer(cfg.text, self.dtype, self.attention)
    self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype, self.attention)
    self.visual_projection = dense(cfg.projection_dim, self.dtype, use_bias=False)
    self.text_projection = dense(cfg.projection_dim, self.dtype, use_bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), jnp.float32)

  def get_image_features(self, pixel_values):
    _, pooled = self.vision_model(pixel_values)
    return self.visual_projection(pooled).astype(jnp.float32)

  def get_text_features(self, input_ids):
    _, pooled = self.text_model(input_ids, return_pooled=True)
    return self.text_projection(pooled).astype(jnp.float32)

  def __call__(self, input_ids, pixel_values):
    img = self.get_image_features(pixel_values)
    txt = self.get_text_features(input_ids)
    norm = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale) * norm(img) @ norm(txt).T
    return img, txt, logits


def clip_dummy_inputs(config: CLIPConfig, batch: int = 1):
  """``(input_ids, pixel_values)`` to initialise or trace a :class:`CLIPModel`."""
  s, c = config.vision.image_size, config.vision.num_channels
  return (jnp.zeros((batch, 1), jnp.int32), jnp.zeros((batch, s, s, c), jnp.float32))
