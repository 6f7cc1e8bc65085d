"""Stable Diffusion XL (diffusers layout) → Flax: UNet, VAE, both CLIP text encoders and both tokenizers.

    python -m dmd_jax.convert sdxl --src=stable-diffusion-xl-base-1.0/ --dst=teachers/sdxl

``--src`` is a folder in diffusers layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (a
transformers ``CLIPTextModel``, CLIP ViT-L), ``text_encoder_2/`` (a ``CLIPTextModelWithProjection``, OpenCLIP
ViT-bigG), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``). The conversion is Stable Diffusion's
(``dmd_jax.families.sd.convert``, with the second encoder and tokenizer added): ``.safetensors`` weights are read
without torch (``.bin`` needs torch); every state dict is checked against the Flax module built from the
subfolder's ``config.json`` (missing, unexpected and mis-shaped keys are all named), and the configs against each
other (the UNet's ``text_time`` conditioning, its cross-attention width = the two encoders' widths, its pooled
width = the second encoder's ``projection_dim``), before anything is written. The destination holds one converted
folder per network (``params.npz`` + the original ``config.json``), both tokenizers and the scheduler config.

Names: as SD's (``add_embedding.linear_1.weight`` ↔ ``add_embedding/linear_1/kernel``); the second encoder keeps
transformers' ``text_model.`` prefix (``text_model.encoder.layers.0.mlp.fc1.weight`` ↔
``text_model/encoder/layers_0/mlp/fc1/kernel``; ``text_projection.weight`` ↔ ``text_projection/kernel``).

SDXL's conditioning (:func:`encode_prompt`, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``): both
encoders' penultimate hidden states concatenated, ``[B, 77, 768 + 1280]``, and the second encoder's
``text_embeds`` ``[B, 1280]`` for the UNet's ``added_cond`` (with the 6 ``time_ids``: original size, crop
top-left, target size).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dmd_jax.convert.clip import write_tokenizer_files
from dmd_jax.convert.common import ConversionError, read_folder_config
from dmd_jax.families.sd import convert as sdc

HELP = "Stable Diffusion XL folder in diffusers layout (UNet, VAE, two CLIP text encoders, two tokenizers)"
# {subfolder: kind of network} (kinds: dmd_jax.families.sd.convert)
NETWORKS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder",
            "text_encoder_2": "text_encoder_with_projection"}
TOKENIZERS = ("tokenizer", "tokenizer_2")
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


# ---------------------------------------------------------------------------------------------------------
# The pipeline's configs, checked against each other
# ---------------------------------------------------------------------------------------------------------

def check_configs(configs: Mapping[str, Mapping[str, Any]], where: str = "") -> None:
  """``ConversionError`` unless ``configs`` (``{network: config.json dict}``) make an SDXL pipeline: a
  ``text_time`` UNet whose cross-attention width is the two text encoders' hidden sizes added and whose
  ``projection_class_embeddings_input_dim`` is the second encoder's ``projection_dim`` + 6 time ids ×
  ``addition_time_embed_dim``."""
  unet, te1, te2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
  where = f"{where}: " if where else ""
  if unet.get("addition_embed_type") != "text_time":
    raise ConversionError(f"{where}unet/config.json: addition_embed_type={unet.get('addition_embed_type')!r}; "
                          "an SDXL UNet has 'text_time'")
  widths = (int(te1.get("hidden_size", 512)), int(te2.get("hidden_size", 512)))
  cross = unet.get("cross_attention_dim", 1280)
  if any(c != sum(widths) for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
    raise ConversionError(f"{where}unet/config.json: cross_attention_dim={cross!r}, but the text encoders' "
                          f"hidden sizes are {widths[0]} + {widths[1]} = {sum(widths)}")
  pooled = int(te2.get("projection_dim", 512))
  want = pooled + 6 * int(unet.get("addition_time_embed_dim") or 0)
  if unet.get("projection_class_embeddings_input_dim") != want:
    raise ConversionError(
        f"{where}unet/config.json: projection_class_embeddings_input_dim="
        f"{unet.get('projection_class_embeddings_input_dim')!r}, but text_encoder_2's projection_dim {pooled} + 6 "
        f"time ids x addition_time_embed_dim {unet.get('addition_time_embed_dim')!r} = {want}")


# ---------------------------------------------------------------------------------------------------------
# Converting, saving, loading
# ---------------------------------------------------------------------------------------------------------

def convert_pipeline(src_dir: str | os.PathLike, dtype=jnp.float32, attention: str = "auto") -> dict[str, Any]:
  """Converts a diffusers SDXL folder. Returns ``{'unet': (module, params), 'vae': ..., 'text_encoder': ...,
  'text_encoder_2': ..., 'tokenizer': CLIPTokenizer, 'tokenizer_2': CLIPTokenizer, 'configs': {network:
  original config dict}, 'scheduler_config': dict | None}``. ``dtype`` is the modules' activation dtype
  (parameters stay float32), ``attention`` their attention kernel."""
  src_dir = os.fspath(src_dir)
  if not os.path.isdir(src_dir):
    raise ConversionError(f"no such folder: {src_dir!r}")
  configs = {}
  for name in NETWORKS:  # the configs' consistency first, before the (slow) weight reads
    folder = os.path.join(src_dir, name)
    if not os.path.isdir(folder):
      raise ConversionError(f"{src_dir!r} has no {name}/ subfolder (expected an SDXL folder in diffusers layout: "
                            f"{', '.join(f'{n}/' for n in tuple(NETWORKS) + TOKENIZERS)}, scheduler/)")
    configs[name] = read_folder_config(folder)
  check_configs(configs, src_dir)
  return sdc.convert_pipeline(src_dir, dtype, attention, networks=NETWORKS, tokenizers=TOKENIZERS)


def save_converted_sdxl(converted: Mapping[str, Any], dst_dir: str | os.PathLike) -> None:
  """Writes ``dst/{unet,vae,text_encoder,text_encoder_2}/`` (params.npz + config.json), ``dst/tokenizer/``,
  ``dst/tokenizer_2/`` and ``dst/scheduler/scheduler_config.json``."""
  sdc.save_converted_sd(converted, dst_dir, networks=tuple(NETWORKS), tokenizers=TOKENIZERS)


def load_converted_sdxl(src_dir: str | os.PathLike, dtype=jnp.float32, attention: str = "auto") -> dict[str, Any]:
  """Reads what :func:`save_converted_sdxl` wrote, as the same dict :func:`convert_pipeline` returns
  (parameter shapes checked against the modules, configs against each other; ``dtype`` and ``attention`` as
  there)."""
  out = sdc.load_converted_sd(src_dir, dtype, attention, networks=NETWORKS, tokenizers=TOKENIZERS)
  check_configs(out["configs"], os.fspath(src_dir))
  return out


# ---------------------------------------------------------------------------------------------------------
# The prompt conditioning
# ---------------------------------------------------------------------------------------------------------

def tokenize(tokenizer, prompts) -> np.ndarray:
  """``[B, model_max_length]`` int32 ids, padded to and truncated at the tokenizer's ``model_max_length`` (as the
  SDXL pipeline tokenizes; the first tokenizer pads with end-of-text, the second with ``!``)."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
  return np.asarray(ids, np.int32)


def encode_prompt(text_encoder, text_encoder_2, input_ids, input_ids_2, clip_skip: int | None = None):
  """SDXL's text conditioning: ``(prompt_embeds [B, L, D1 + D2], pooled [B, P])``, float32.
  ``text_encoder`` / ``text_encoder_2`` are ``(module, params)`` pairs (as :func:`load_converted_sdxl` returns
  them), ``input_ids`` / ``input_ids_2`` their tokens (:func:`tokenize`). ``prompt_embeds`` is both encoders'
  hidden state ``hidden_states[-(clip_skip + 2)]`` (the penultimate one without ``clip_skip``) concatenated;
  ``pooled`` is the second encoder's ``text_embeds``. Jittable (modules and pairs closed over or static)."""
  layer = -2 if clip_skip is None else -(clip_skip + 2)
  (m1, p1), (m2, p2) = text_encoder, text_encoder_2
  h1 = m1.apply({"params": p1}, input_ids, hidden_layer=layer)
  h2, pooled = m2.apply({"params": p2}, input_ids_2, hidden_layer=layer)
  return jnp.concatenate([h1, h2], axis=-1), pooled


def time_ids(original_size, crop_top_left=(0, 0), target_size=None) -> np.ndarray:
  """SDXL's 6 ``time_ids`` ``[h, w, top, left, target h, target w]`` (float32; target size defaults to the
  original size), the ``added_cond['time_ids']`` of one image."""
  target_size = original_size if target_size is None else target_size
  return np.asarray([*original_size, *crop_top_left, *target_size], np.float32)


# ---------------------------------------------------------------------------------------------------------
# Command line (found through dmd_jax.families.FAMILIES by dmd_jax/convert/__main__.py)
# ---------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True, help="Stable Diffusion XL folder in diffusers layout")
  parser.add_argument("--dst", required=True, help="output folder for the converted networks")


def run(args: argparse.Namespace) -> None:
  converted = convert_pipeline(args.src)
  save_converted_sdxl(converted, args.dst)
  for name in NETWORKS:
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(converted[name][1]))
    print(f"{name}: {n:,} parameters -> {os.path.join(args.dst, name)}")
  for name in TOKENIZERS:
    print(f"{name} -> {os.path.join(args.dst, name)}")


# ---------------------------------------------------------------------------------------------------------
# Configurations: SDXL in miniature (the ``:tiny`` configs and the tests) and the released ones
# ---------------------------------------------------------------------------------------------------------

# SDXL in miniature: 8×8×4 latents; a 2-level UNet whose first level has no attention (SDXL's three levels are
# DownBlock2D, then two cross-attention levels), per-block transformer depths and head counts, linear projections,
# text_time conditioning with 8-wide time-id embeddings; two CLIP text encoders of widths 16 and 32 (their
# penultimate states concatenated: the UNet's cross-attention width 48), the second projecting its pooled output
# to 24 (72 = 24 + 6 × 8 into add_embedding); a 2-level VAE (16×16 images) with SDXL's scaling factor.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], use_linear_projection=True,
    cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=72, norm_num_groups=4)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=16, scaling_factor=0.13025, force_upcast=True)
TINY_CLIP = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63,
    projection_dim=16)
# The second encoder pads with "!" (id 56 in the tiny vocabulary; 0 in bigG's), not with end-of-text.
TINY_CLIP_2 = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="gelu", bos_token_id=62, eos_token_id=63, pad_token_id=56,
    projection_dim=24)
TINY_PAD_2 = ("!", 56)
# The released SDXL base 1.0 (abridged config.json files): the UNet (2,567,463,684 parameters) and the second text
# encoder (OpenCLIP ViT-bigG/14 with projection, 694,659,840); the first text encoder is SD 1.5's CLIP ViT-L/14
# (sdc.SD15_TEXT) and the VAE SD's with scaling_factor 0.13025. Traced abstractly by tests/test_sdxl_models.py.
SDXL_UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, class_embed_type=None,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True)
SDXL_TEXT = dict(sdc.SD15_TEXT)
SDXL_TEXT_2 = dict(
    architectures=["CLIPTextModelWithProjection"], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
    eos_token_id=2, hidden_act="gelu", hidden_size=1280, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=5120, layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=20, num_hidden_layers=32, pad_token_id=1, projection_dim=1280, vocab_size=49408)
SDXL_VAE = dict(sdc.SD15_VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
# SDXL base 1.0's scheduler folder (diffusers EulerDiscreteScheduler): SD's scaled-linear epsilon schedule.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"]}


# ---------------------------------------------------------------------------------------------------------
# A tiny random-weight pipeline (the ``:tiny`` configs and the tests), written without torch
# ---------------------------------------------------------------------------------------------------------

def write_tokenizer_2_files(folder: str | os.PathLike, model_max_length: int | None = None,
                            pad: tuple[str, int] = TINY_PAD_2) -> None:
  """The tiny CLIP tokenizer (:func:`dmd_jax.convert.clip.write_tokenizer_files`) with a pad token other than
  end-of-text, as SDXL's ``tokenizer_2`` pads with ``!``: ``pad = (token, id)`` is added to ``vocab.json`` and
  named ``pad_token`` in ``tokenizer_config.json``."""
  folder = os.fspath(folder)
  write_tokenizer_files(folder, model_max_length)
  token, token_id = pad
  path = os.path.join(folder, "vocab.json")
  with open(path) as f:
    vocab = json.load(f)
  if token_id in vocab.values():
    raise ValueError(f"pad id {token_id} is taken in the tiny vocabulary")
  vocab[token] = token_id
  with open(path, "w") as f:
    json.dump(vocab, f)
  path = os.path.join(folder, "tokenizer_config.json")
  config = {"tokenizer_class": "CLIPTokenizer"}
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
  config["pad_token"] = token
  with open(path, "w") as f:
    json.dump(config, f)


def write_random_pipeline(dst: str | os.PathLike, seed: int = 0, unet_config=None, vae_config=None,
                          text_config=None, text_config_2=None) -> str:
  """Writes a diffusers-layout SDXL folder with random weights (``.safetensors``, no torch needed): ``unet/``,
  ``vae/``, ``text_encoder/``, ``text_encoder_2/`` (config.json + weights), ``tokenizer/`` and ``tokenizer_2/``
  (the tiny tokenizer; the second padding with ``!``), ``scheduler/`` (SDXL's) and ``model_index.json``.
  Defaults: the ``TINY_*`` configurations. Returns ``dst``. Convert it like a real pipeline
  (:func:`convert_pipeline`)."""
  dst = os.fspath(dst)
  configs = {"unet": dict(unet_config or TINY_UNET), "vae": dict(vae_config or TINY_VAE),
             "text_encoder": dict(text_config or TINY_CLIP), "text_encoder_2": dict(text_config_2 or TINY_CLIP_2)}
  configs["unet"].setdefault("_class_name", "UNet2DConditionModel")
  configs["vae"].setdefault("_class_name", "AutoencoderKL")
  for name, arch in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")):
    configs[name].setdefault("model_type", "clip_text_model")
    configs[name].setdefault("architectures", [arch])
  check_configs(configs, "write_random_pipeline")
  for i, (name, kind) in enumerate(NETWORKS.items()):
    folder = os.path.join(dst, name)
    os.makedirs(folder, exist_ok=True)
    sd = sdc.random_torch_state_dict(name, configs[name], seed + i, kind=kind)
    if name == "unet":   # keep the random teacher's epsilon near unit scale, as SD's random pipeline does
      sd["conv_out.weight"] = sd["conv_out.weight"] * 0.1
    save_file(sd, os.path.join(folder, _WEIGHT_FILES[name]))
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(configs[name], f, indent=1)
  write_tokenizer_files(os.path.join(dst, "tokenizer"), configs["text_encoder"]["max_position_embeddings"])
  write_tokenizer_2_files(os.path.join(dst, "tokenizer_2"), configs["text_encoder_2"]["max_position_embeddings"])
  os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
  with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SDXL_SCHEDULER, f, indent=1)
  with open(os.path.join(dst, "model_index.json"), "w") as f:
    json.dump(MODEL_INDEX, f, indent=1)
  return dst


def write_random_converted(dst: str | os.PathLike, seed: int = 0, **configs) -> str:
  """:func:`write_random_pipeline` into ``<dst>-source``, then the real converter into ``dst`` (a random tiny SDXL
  teacher). Returns ``dst``."""
  dst = os.fspath(dst)
  src = write_random_pipeline(dst + "-source", seed, **configs)
  save_converted_sdxl(convert_pipeline(src), dst)
  return dst
