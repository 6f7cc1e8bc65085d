"""CLIP transformers (``transformers.CLIPTextModel``'s ``text_model``) in Flax Linen.

    text = CLIPTextTransformer(CLIPTextConfig.from_hf(json.load(open('text_encoder/config.json'))))
    hidden = text.apply({'params': p}, input_ids)                       # last_hidden_state [B, L, D]
    hidden, pooled = text.apply({'params': p}, input_ids, return_pooled=True)

Stable Diffusion 1.x conditions on ``last_hidden_state`` (after the final LayerNorm). The pre-LN encoder
(:class:`CLIPEncoder`) takes an optional additive mask, so a vision tower (patch embedding + class token +
``pre_layrnorm`` + the same encoder + ``post_layernorm``) can reuse it for CLIP score. Parameter names mirror
the PyTorch state dict without the ``text_model.`` prefix (``encoder.layers.3.mlp.fc1.weight`` ↔
``encoder/layers_3/mlp/fc1/kernel``). LayerNorm statistics and the softmax are float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.models.unet2d import LayerNorm, _dense, dot_product_attention

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

  @nn.compact
  def __call__(self, x, mask=None):
    c = x.shape[-1]
    q = _dense(c, self.dtype, "q_proj")(x)
    k = _dense(c, self.dtype, "k_proj")(x)
    v = _dense(c, self.dtype, "v_proj")(x)
    out = dot_product_attention(q, k, v, self.heads, mask=mask)
    return _dense(c, self.dtype, "out_proj")(out)


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _ACTIVATIONS[self.hidden_act](_dense(self.intermediate_size, self.dtype, "fc1")(x))
    return _dense(x.shape[-1], self.dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    x = x + CLIPAttention(self.heads, self.dtype, name="self_attn")(
        LayerNorm(self.eps, self.dtype, name="layer_norm1")(x), mask)
    x = x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
        LayerNorm(self.eps, self.dtype, name="layer_norm2")(x))
    return x


class CLIPEncoder(nn.Module):
  """The pre-LayerNorm transformer shared by the text and vision towers; ``mask`` is additive
  (``[L, L]`` or ``[B, 1, L, L]``, 0 to keep and -inf to drop)."""
  num_layers: int
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.dtype,
                           name=f"layers_{i}")(x, mask)
    return x


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
  pre-LN transformer, final LayerNorm. ``return_pooled`` adds the state at the first end-of-text token
  (the last-id argmax for legacy configs with ``eos_token_id == 2``, as transformers does)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, return_pooled: bool = False):
    cfg = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    n = input_ids.shape[-1]
    x = CLIPTextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, self.dtype,
                           name="embeddings")(input_ids)
    causal = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)
    x = CLIPEncoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                    cfg.layer_norm_eps, self.dtype, name="encoder")(x, causal)
    x = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="final_layer_norm")(x)
    if not return_pooled:
      return x
    if cfg.eos_token_id == 2:
      idx = jnp.argmax(input_ids, axis=-1)
    else:
      idx = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    return x, x[jnp.arange(x.shape[0]), idx]


def dummy_inputs(config: CLIPTextConfig, batch: int = 1):
  return (jnp.zeros((batch, 1), jnp.int32),)
