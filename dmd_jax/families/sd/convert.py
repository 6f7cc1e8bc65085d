"""Stable Diffusion (diffusers layout) → Flax: UNet, VAE, CLIP text encoder and tokenizer.

    python -m dmd_jax.convert sd --src=stable-diffusion-v1-5/ --dst=teachers/sd15

``--src`` is a folder in diffusers layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``). ``.safetensors`` weights are read without torch; ``.bin`` needs torch.
Every state dict is checked against the Flax module built from the subfolder's ``config.json`` (missing,
unexpected and mis-shaped keys are all named) before anything is written. The destination holds one
converted folder per network (``params.npz`` + the original ``config.json``, see ``common.save_converted``),
the tokenizer files and the scheduler config.

Names: a Flax path is the PyTorch key with list indices folded into the module name
(``up_blocks.1.attentions.0.proj_in.weight`` ↔ ``up_blocks_1/attentions_0/proj_in/kernel``); conv weights go
OIHW → HWIO, linear weights are transposed, norm ``weight`` → ``scale``, embedding ``weight`` → ``embedding``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dmd_jax.convert.clip import load_tokenizer, write_tokenizer_files
from dmd_jax.convert.common import (ConversionError, check_state_dict, expected_shapes, flatten_params,
                                    from_torch, load_converted, load_state_dict, random_state_dict,
                                    read_folder_config, save_converted, to_torch, torch_shape, unflatten_params,
                                    weight_files)
from dmd_jax.models import clip as clip_lib
from dmd_jax.models import unet2d as unet_lib
from dmd_jax.models import vae as vae_lib
from dmd_jax.models.attention import check_implementation

HELP = "Stable Diffusion 1.x/2.x folder in diffusers layout (UNet, VAE, CLIP text encoder, tokenizer)"
NETWORKS = ("unet", "vae", "text_encoder")
TOKENIZERS = ("tokenizer",)
# The kinds of network a diffusers SD-style folder holds, by the weight-file stem of their subfolder. A subfolder's
# kind is its name unless the caller says otherwise (SDXL's text_encoder_2/ is a "text_encoder_with_projection").
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
    "text_encoder_with_projection": "model"}
_TORCH_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}
# Module names that hold a PyTorch ModuleList/Sequential: `<name>_<i>` in Flax is `<name>.<i>` in PyTorch.
_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|"
                    r"to_out|net|layers)_(\d+)$")


# ---------------------------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------------------------

def torch_key(flax_path: str) -> str:
  """``down_blocks_0/resnets_1/conv1/kernel`` → ``down_blocks.0.resnets.1.conv1.weight``."""
  *mods, leaf = flax_path.split("/")
  parts = [m.group(1) + "." + m.group(2) if (m := _LISTS.match(p)) else p for p in mods]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], what: str,
                       ignore=()) -> dict[str, Any]:
  """Checks a PyTorch state dict against the Flax shapes and returns the Flax parameter tree."""
  expected = {torch_key(p): torch_shape(p.rsplit("/", 1)[-1], s) for p, s in shapes.items()}
  check_state_dict(state_dict, expected, what, ignore=ignore)
  flat = {p: from_torch(p.rsplit("/", 1)[-1], state_dict[torch_key(p)]) for p, s in shapes.items()}
  for p, s in shapes.items():  # internal consistency: the layout map must land on the module's shapes
    assert flat[p].shape == s, (p, flat[p].shape, s)
  return unflatten_params(flat)


def to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`convert_state_dict`: a Flax parameter tree (UNet, VAE or text encoder) →
  ``{diffusers / transformers name: float32 array in PyTorch layout}``, e.g. a UNet's as
  ``UNet2DConditionModel.load_state_dict`` takes it (VAE attention in the current ``to_q`` naming; text-encoder
  keys without transformers' ``text_model.`` prefix)."""
  out: dict[str, np.ndarray] = {}
  for path, value in flatten_params(params).items():
    key = torch_key(path)
    if key in out:   # two Flax paths on one name would silently drop a tensor
      raise ConversionError(f"Flax parameters {path!r} and another both map to the PyTorch name {key!r}")
    out[key] = to_torch(path.rsplit("/", 1)[-1], value)
  return out


_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_old_vae_attention(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Older VAE checkpoints name the mid-block attention ``query/key/value/proj_attn`` (and some store them
  as 1×1 convs); diffusers renames them on load, and so do we."""
  out = {}
  for k, v in sd.items():
    m = re.match(r"^(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", k)
    if m:
      k = m.group(1) + _OLD_VAE_ATTN[m.group(2)] + "." + m.group(3)
      if v.ndim == 4 and v.shape[2:] == (1, 1):
        v = v[:, :, 0, 0]
    elif re.match(r"^.*\.mid_block\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", k) and v.ndim == 4 \
        and v.shape[2:] == (1, 1):
      v = v[:, :, 0, 0]
    out[k] = v
  return out


# ---------------------------------------------------------------------------------------------------------
# Reading a diffusers folder
# ---------------------------------------------------------------------------------------------------------

def _subfolder(src_dir: str, name: str) -> str:
  path = os.path.join(src_dir, name)
  if not os.path.isdir(path):
    raise ConversionError(f"{src_dir!r} has no {name}/ subfolder (expected a pipeline folder in diffusers layout: "
                          f"unet/, vae/, text encoder and tokenizer folders, scheduler/)")
  return path


def _read_state_dict(folder: str, stem: str) -> dict[str, np.ndarray]:
  sd = {}
  for path in weight_files(folder, stem, _TORCH_NAMES[stem]):
    sd.update(load_state_dict(path))
  return sd


# The builders: ``(module, dummy inputs)`` from a subfolder's config.json dict. ``dtype`` is the activation
# dtype (parameters stay float32), ``attention`` the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see
# dmd_jax.models.attention); a config this port does not implement, or another ``attention``, is a ValueError.

def build_unet(config: Mapping[str, Any], dtype=jnp.float32, remat: bool = False, attention: str = "auto"):
  cfg = unet_lib.UNetConfig.from_diffusers(config)
  module = unet_lib.UNet2DConditionModel(cfg, dtype=dtype, remat=remat, attention=check_implementation(attention))
  return module, unet_lib.dummy_inputs(cfg)


def build_vae(config: Mapping[str, Any], dtype=jnp.float32, attention: str = "auto"):
  cfg = vae_lib.VAEConfig.from_diffusers(config)
  return vae_lib.AutoencoderKL(cfg, dtype=dtype, attention=check_implementation(attention)), vae_lib.dummy_inputs(cfg)


def build_text_encoder(config: Mapping[str, Any], dtype=jnp.float32, attention: str = "auto"):
  cfg = clip_lib.CLIPTextConfig.from_hf(config)
  module = clip_lib.CLIPTextTransformer(cfg, dtype=dtype, attention=check_implementation(attention))
  return module, clip_lib.dummy_inputs(cfg)


def build_text_encoder_with_projection(config: Mapping[str, Any], dtype=jnp.float32, attention: str = "auto"):
  """A transformers ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``)."""
  cfg = clip_lib.CLIPTextConfig.from_hf(config)
  module = clip_lib.CLIPTextModelWithProjection(cfg, dtype=dtype, attention=check_implementation(attention))
  return module, clip_lib.dummy_inputs(cfg)


_BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
             "text_encoder_with_projection": build_text_encoder_with_projection}


def _build(name: str, config: Mapping[str, Any], dtype, attention: str = "auto", kind: str | None = None):
  """The module of subfolder ``name`` (of ``kind``, default ``name``: a key of ``_WEIGHT_NAMES``)."""
  builder = _BUILDERS[kind or name]
  check_implementation(attention)  # before the config's errors are attributed to the config file
  try:
    return builder(config, dtype=dtype, attention=attention)
  except ValueError as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{name}/config.json: {e}") from e


def convert_network(src_dir: str, name: str, dtype=jnp.float32, attention: str = "auto", kind: str | None = None):
  """Converts one subfolder (``unet``, ``vae``, ``text_encoder``; any name with ``kind`` one of those or
  ``text_encoder_with_projection``): ``(module, params, config_dict)``."""
  kind = kind or name
  folder = _subfolder(src_dir, name)
  config = read_folder_config(folder)
  module, inputs = _build(name, config, dtype, attention, kind)
  sd = _read_state_dict(folder, _WEIGHT_NAMES[kind])
  ignore = ()
  if kind == "vae":
    sd = _rename_old_vae_attention(sd)
  if kind == "text_encoder":
    # transformers < 5 (and the SD releases) prefix the keys with `text_model.`; 5.x saves them without.
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    ignore = ("embeddings.position_ids",)  # a buffer that older files carry
  if kind == "text_encoder_with_projection":  # every transformers version keeps `text_model.` here
    ignore = ("text_model.embeddings.position_ids",)
  params = convert_state_dict(sd, expected_shapes(module, inputs), f"{name} ({folder})", ignore=ignore)
  return module, params, config


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _networks(networks: Mapping[str, str] | None) -> Mapping[str, str]:
  return {name: name for name in NETWORKS} if networks is None else networks


def convert_pipeline(src_dir: str | os.PathLike, dtype=jnp.float32, attention: str = "auto",
                     networks: Mapping[str, str] | None = None, tokenizers=TOKENIZERS) -> dict[str, Any]:
  """Converts a diffusers SD folder. Returns ``{'unet': (module, params), 'vae': ..., 'text_encoder': ...,
  'tokenizer': CLIPTokenizer, 'configs': {network: original config dict}, 'scheduler_config': dict | None}``.
  ``dtype`` is the modules' activation dtype (parameters stay float32), ``attention`` their attention kernel.
  ``networks`` (``{subfolder: kind}``, default SD's three) and ``tokenizers`` (subfolders) name what the folder
  holds for other members of the family (SDXL)."""
  src_dir = os.fspath(src_dir)
  networks = _networks(networks)
  if not os.path.isdir(src_dir):
    raise ConversionError(f"no such folder: {src_dir!r}")
  for name in tuple(networks) + tuple(tokenizers):  # fail early, before the (slow) loads
    _subfolder(src_dir, name)
  out: dict[str, Any] = {"configs": {}}
  for name, kind in networks.items():
    module, params, config = convert_network(src_dir, name, dtype, attention, kind)
    out[name] = (module, params)
    out["configs"][name] = config
  for name in tokenizers:
    out[name] = load_tokenizer(os.path.join(src_dir, name))
  out["scheduler_config"] = _read_json(os.path.join(src_dir, "scheduler", "scheduler_config.json"))
  return out


# ---------------------------------------------------------------------------------------------------------
# The converted folder
# ---------------------------------------------------------------------------------------------------------

def save_converted_sd(converted: Mapping[str, Any], dst_dir: str | os.PathLike, networks=NETWORKS,
                      tokenizers=TOKENIZERS) -> None:
  """Writes ``dst/{unet,vae,text_encoder}/`` (params.npz + config.json), ``dst/tokenizer/`` and
  ``dst/scheduler/scheduler_config.json`` (``networks`` / ``tokenizers``: other subfolder names)."""
  dst_dir = os.fspath(dst_dir)
  os.makedirs(dst_dir, exist_ok=True)
  for name in tokenizers:
    converted[name].save_pretrained(os.path.join(dst_dir, name))
  if converted.get("scheduler_config") is not None:
    os.makedirs(os.path.join(dst_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(dst_dir, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(converted["scheduler_config"], f, indent=1, sort_keys=True)
  for name in networks:
    save_converted(os.path.join(dst_dir, name), jax.device_get(converted[name][1]), converted["configs"][name])


def load_converted_sd(src_dir: str | os.PathLike, dtype=jnp.float32, attention: str = "auto",
                      networks: Mapping[str, str] | None = None, tokenizers=TOKENIZERS) -> dict[str, Any]:
  """Reads what :func:`save_converted_sd` wrote, as the same dict :func:`convert_pipeline` returns
  (parameter shapes checked against the modules; ``dtype``, ``attention``, ``networks`` and ``tokenizers`` as
  there)."""
  src_dir = os.fspath(src_dir)
  out: dict[str, Any] = {"configs": {}}
  for name, kind in _networks(networks).items():
    params, config = load_converted(os.path.join(src_dir, name))
    module, inputs = _build(name, config, dtype, attention, kind)
    want = expected_shapes(module, inputs)
    check_state_dict(flatten_params(params), want, f"converted {name} ({src_dir})")
    out[name] = (module, params)
    out["configs"][name] = config
  for name in tokenizers:
    out[name] = load_tokenizer(os.path.join(src_dir, name))
  out["scheduler_config"] = _read_json(os.path.join(src_dir, "scheduler", "scheduler_config.json"))
  return out


# ---------------------------------------------------------------------------------------------------------
# Command line (registered in dmd_jax/convert/__main__.py)
# ---------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True, help="Stable Diffusion folder in diffusers layout")
  parser.add_argument("--dst", required=True, help="output folder for the converted networks")


def run(args: argparse.Namespace) -> None:
  converted = convert_pipeline(args.src)
  save_converted_sd(converted, args.dst)
  for name in NETWORKS:
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(converted[name][1]))
    print(f"{name}: {n:,} parameters -> {os.path.join(args.dst, name)}")
  print(f"tokenizer -> {os.path.join(args.dst, 'tokenizer')}")


# ---------------------------------------------------------------------------------------------------------
# A tiny random-weight pipeline (the ``:tiny`` configs and the tests), written without torch
# ---------------------------------------------------------------------------------------------------------

# SD 1.x in miniature: 8×8×4 latents, a 2-level UNet with int attention_head_dim and 1×1-conv projections,
# a 2-level VAE (16×16 images), a 2-layer CLIP text encoder with 16 positions. The UNet's cross-attention
# width is the text encoder's hidden size, as in a real pipeline.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=16, scaling_factor=0.18215)
TINY_CLIP = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63,
    projection_dim=32)
# The released configurations (abridged config.json files): SD 1.5's UNet (859,520,964 parameters), VAE
# (83,653,863) and CLIP ViT-L/14 text encoder (123,060,480), and SD 2.x's 768 px UNet (865,910,724). Traced
# abstractly by tests/test_sd_models.py and bench/sd_memory.py (no weights).
SD15_UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, out_channels=3, sample_size=512, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT = dict(
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0, initializer_range=0.02, intermediate_size=3072,
    layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=12,
    num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype="float32", vocab_size=49408)
SD2_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True, sample_size=96)
# SD 1.5's scheduler folder (diffusers PNDMScheduler): the schedule the VP teachers here assume.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None}


def random_torch_state_dict(name: str, config: Mapping[str, Any], seed: int = 0,
                            kind: str | None = None) -> dict[str, np.ndarray]:
  """A random state dict in PyTorch layout and naming for the ``unet`` / ``vae`` / ``text_encoder`` (or a
  subfolder ``name`` of ``kind``) built from ``config`` — the keys and shapes the converter expects, from the
  Flax module (no torch)."""
  module, inputs = _build(name, config, jnp.float32, kind=kind)
  shapes = {torch_key(p): torch_shape(p.rsplit("/", 1)[-1], s)
            for p, s in expected_shapes(module, inputs).items()}
  return random_state_dict(shapes, seed)


def write_random_pipeline(dst: str | os.PathLike, seed: int = 0, unet_config=None, vae_config=None,
                          text_config=None) -> str:
  """Writes a diffusers-layout SD folder with random weights (``.safetensors``, no torch needed): ``unet/``,
  ``vae/``, ``text_encoder/`` (config.json + weights), ``tokenizer/`` (:func:`write_tokenizer_files`),
  ``scheduler/`` (SD 1.5's) and ``model_index.json``. Defaults: the ``TINY_*`` configurations. Returns ``dst``.
  Convert it like a real pipeline (``convert_pipeline``)."""
  dst = os.fspath(dst)
  configs = {"unet": dict(unet_config or TINY_UNET), "vae": dict(vae_config or TINY_VAE),
             "text_encoder": dict(text_config or TINY_CLIP)}
  configs["unet"].setdefault("_class_name", "UNet2DConditionModel")
  configs["vae"].setdefault("_class_name", "AutoencoderKL")
  configs["text_encoder"].setdefault("model_type", "clip_text_model")
  configs["text_encoder"].setdefault("architectures", ["CLIPTextModel"])
  for i, name in enumerate(NETWORKS):
    folder = os.path.join(dst, name)
    os.makedirs(folder, exist_ok=True)
    sd = random_torch_state_dict(name, configs[name], seed + i)
    if name == "unet":   # keep the random teacher's epsilon near unit scale (x0 = (z - s eps) / sqrt(abar))
      sd["conv_out.weight"] = sd["conv_out.weight"] * 0.1
    save_file(sd, os.path.join(folder, _WEIGHT_NAMES[name] + ".safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(configs[name], f, indent=1)
  write_tokenizer_files(os.path.join(dst, "tokenizer"), configs["text_encoder"]["max_position_embeddings"])
  os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
  with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SD15_SCHEDULER, f, indent=1)
  with open(os.path.join(dst, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, f)
  return dst


def write_random_converted(dst: str | os.PathLike, seed: int = 0, **configs) -> str:
  """:func:`write_random_pipeline` into ``<dst>-source`` then the real converter into ``dst`` (the
  ``teacher.path='random'`` teacher of ``configs/coco.py:tiny``). Returns ``dst``."""
  dst = os.fspath(dst)
  src = write_random_pipeline(dst + "-source", seed, **configs)
  save_converted_sd(convert_pipeline(src), dst)
  return dst
