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

from dmd_jax.convert.common import (ConversionError, check_state_dict, flatten_params, from_torch,
                                    load_converted, load_state_dict, save_converted, torch_shape,
                                    unflatten_params)
from dmd_jax.models import clip as clip_lib
from dmd_jax.models import unet2d as unet_lib
from dmd_jax.models import vae as vae_lib

HELP = "Stable Diffusion 1.x/2.x folder in diffusers layout (UNet, VAE, CLIP text encoder, tokenizer)"
NETWORKS = ("unet", "vae", "text_encoder")
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
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


def expected_shapes(module, inputs) -> dict[str, tuple]:
  """The module's parameter shapes ``{flax path: shape}``, traced abstractly (no memory, no compute)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      key = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(v, key)
      else:
        flat[key] = tuple(v.shape)

  walk(shapes, "")
  return flat


def convert_state_dict(state_dict: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], what: str,
                       ignore=()) -> dict[str, Any]:
  """Checks a PyTorch state dict against the Flax shapes and returns the Flax parameter tree."""
  expected = {torch_key(p): torch_shape(p.rsplit("/", 1)[-1], s) for p, s in shapes.items()}
  check_state_dict(state_dict, expected, what, ignore=ignore)
  flat = {p: from_torch(p.rsplit("/", 1)[-1], state_dict[torch_key(p)]) for p, s in shapes.items()}
  for p, s in shapes.items():  # internal consistency: the layout map must land on the module's shapes
    assert flat[p].shape == s, (p, flat[p].shape, s)
  return unflatten_params(flat)


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
    raise ConversionError(f"{src_dir!r} has no {name}/ subfolder (expected a diffusers-layout folder with "
                          f"unet/, vae/, text_encoder/, tokenizer/)")
  return path


def _read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"missing config: {path!r}")
  with open(path) as f:
    return json.load(f)


def _weights_file(folder: str, stem: str) -> list[str]:
  """The weight file(s) of a subfolder: safetensors first, then the PyTorch pickle; sharded checkpoints
  through their ``.index.json``; ``fp16`` variants last."""
  tstem = _TORCH_NAMES[stem]
  for s, t in ((stem, tstem), (stem + ".fp16", tstem + ".fp16")):
    for name in (s + ".safetensors", t + ".bin"):
      if os.path.exists(os.path.join(folder, name)):
        return [os.path.join(folder, name)]
    for name in (s + ".safetensors.index.json", t + ".bin.index.json"):
      idx = os.path.join(folder, name)
      if os.path.exists(idx):
        with open(idx) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, sh) for sh in shards]
  raise ConversionError(f"no weights in {folder!r} (expected {stem}.safetensors or {tstem}.bin)")


def _read_state_dict(folder: str, stem: str) -> dict[str, np.ndarray]:
  sd = {}
  for path in _weights_file(folder, stem):
    sd.update(load_state_dict(path))
  return sd


def build_unet(config: Mapping[str, Any], dtype=jnp.float32, remat: bool = False):
  cfg = unet_lib.UNetConfig.from_diffusers(config)
  return unet_lib.UNet2DConditionModel(cfg, dtype=dtype, remat=remat), unet_lib.dummy_inputs(cfg)


def build_vae(config: Mapping[str, Any], dtype=jnp.float32):
  cfg = vae_lib.VAEConfig.from_diffusers(config)
  return vae_lib.AutoencoderKL(cfg, dtype=dtype), vae_lib.dummy_inputs(cfg)


def build_text_encoder(config: Mapping[str, Any], dtype=jnp.float32):
  cfg = clip_lib.CLIPTextConfig.from_hf(config)
  return clip_lib.CLIPTextTransformer(cfg, dtype=dtype), clip_lib.dummy_inputs(cfg)


def _build(name: str, config: Mapping[str, Any], dtype):
  builder = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}[name]
  try:
    return builder(config, dtype=dtype)
  except ValueError as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{name}/config.json: {e}") from e


def convert_network(src_dir: str, name: str, dtype=jnp.float32):
  """Converts one subfolder (``unet``, ``vae`` or ``text_encoder``): ``(module, params, config_dict)``."""
  folder = _subfolder(src_dir, name)
  config = _read_config(folder)
  module, inputs = _build(name, config, dtype)
  sd = _read_state_dict(folder, _WEIGHT_NAMES[name])
  ignore = ()
  if name == "vae":
    sd = _rename_old_vae_attention(sd)
  if name == "text_encoder":
    # transformers < 5 (and the SD releases) prefix the keys with `text_model.`; 5.x saves them without.
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    ignore = ("embeddings.position_ids",)  # a buffer that older files carry
  params = convert_state_dict(sd, expected_shapes(module, inputs), f"{name} ({folder})", ignore=ignore)
  return module, params, config


def load_tokenizer(folder: str):
  """A ``transformers.CLIPTokenizer`` from local files (``vocab.json`` + ``merges.txt``, or the
  ``tokenizer.json`` that ``save_pretrained`` writes); never downloads."""
  from transformers import CLIPTokenizer
  has = lambda f: os.path.exists(os.path.join(folder, f))
  if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
    raise ConversionError(f"tokenizer folder {folder!r} lacks vocab.json and merges.txt (or tokenizer.json)")
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def convert_pipeline(src_dir: str | os.PathLike, dtype=jnp.float32) -> dict[str, Any]:
  """Converts a diffusers SD folder. Returns ``{'unet': (module, params), 'vae': ..., 'text_encoder': ...,
  'tokenizer': CLIPTokenizer, 'configs': {network: original config dict}, 'scheduler_config': dict | None}``.
  ``dtype`` is the modules' activation dtype (parameters stay float32)."""
  src_dir = os.fspath(src_dir)
  if not os.path.isdir(src_dir):
    raise ConversionError(f"no such folder: {src_dir!r}")
  for name in NETWORKS + ("tokenizer",):  # fail early, before the (slow) loads
    _subfolder(src_dir, name)
  out: dict[str, Any] = {"configs": {}}
  for name in NETWORKS:
    module, params, config = convert_network(src_dir, name, dtype)
    out[name] = (module, params)
    out["configs"][name] = config
  out["tokenizer"] = load_tokenizer(os.path.join(src_dir, "tokenizer"))
  out["scheduler_config"] = _read_json(os.path.join(src_dir, "scheduler", "scheduler_config.json"))
  return out


# ---------------------------------------------------------------------------------------------------------
# The converted folder
# ---------------------------------------------------------------------------------------------------------

def save_converted_sd(converted: Mapping[str, Any], dst_dir: str | os.PathLike) -> None:
  """Writes ``dst/{unet,vae,text_encoder}/`` (params.npz + config.json), ``dst/tokenizer/`` and
  ``dst/scheduler/scheduler_config.json``."""
  dst_dir = os.fspath(dst_dir)
  os.makedirs(dst_dir, exist_ok=True)
  converted["tokenizer"].save_pretrained(os.path.join(dst_dir, "tokenizer"))
  if converted.get("scheduler_config") is not None:
    os.makedirs(os.path.join(dst_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(dst_dir, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(converted["scheduler_config"], f, indent=1, sort_keys=True)
  for name in NETWORKS:
    save_converted(os.path.join(dst_dir, name), jax.device_get(converted[name][1]), converted["configs"][name])


def load_converted_sd(src_dir: str | os.PathLike, dtype=jnp.float32) -> dict[str, Any]:
  """Reads what :func:`save_converted_sd` wrote, as the same dict :func:`convert_pipeline` returns
  (parameter shapes checked against the modules)."""
  src_dir = os.fspath(src_dir)
  out: dict[str, Any] = {"configs": {}}
  for name in NETWORKS:
    params, config = load_converted(os.path.join(src_dir, name))
    module, inputs = _build(name, config, dtype)
    want = expected_shapes(module, inputs)
    check_state_dict(flatten_params(params), want, f"converted {name} ({src_dir})")
    out[name] = (module, params)
    out["configs"][name] = config
  out["tokenizer"] = load_tokenizer(os.path.join(src_dir, "tokenizer"))
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
