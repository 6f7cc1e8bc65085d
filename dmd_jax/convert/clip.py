"""transformers ``CLIPModel`` folder → Flax :class:`dmd_jax.models.clip.CLIPModel` (for CLIP score).

    python -m dmd_jax.convert clip --src=CLIP-ViT-g-14-laion2B-s12B-b42K/ --dst=weights/clip

``--src`` is a folder written by ``CLIPModel.save_pretrained`` (``config.json`` with ``model_type: clip`` and
``model.safetensors``, or ``pytorch_model.bin`` which needs torch; sharded checkpoints through their
``.index.json``) plus the tokenizer files (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``), as the hub
releases of OpenAI's and LAION's (OpenCLIP) CLIP models have them. The state dict is checked against the
module built from ``config.json`` — missing, unexpected and mis-shaped keys are all named — before anything is
written. The destination holds ``params.npz`` + the original ``config.json`` (``common.save_converted``) and
``tokenizer/``.

Names: the Flax path is the PyTorch key with list indices folded into the module name
(``vision_model.encoder.layers.3.mlp.fc1.weight`` ↔ ``vision_model/encoder/layers_3/mlp/fc1/kernel``); the
patch-embedding conv goes OIHW → HWIO, linear weights are transposed, LayerNorm ``weight`` → ``scale``,
embedding ``weight`` → ``embedding``; ``class_embedding`` and ``logit_scale`` keep their names.
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

from dmd_jax.convert.common import (ConversionError, check_state_dict, expected_shapes, flatten_params,
                                    from_torch, load_converted, load_state_dict, random_state_dict,
                                    read_folder_config, save_converted, torch_shape, unflatten_params,
                                    weight_files)
from dmd_jax.models import clip as clip_lib
from dmd_jax.models.attention import check_implementation

HELP = "transformers CLIPModel folder (config.json + model.safetensors / pytorch_model.bin + tokenizer files)"
# Buffers some files carry; never parameters.
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_LIST = re.compile(r"^(layers)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(flax_path: str) -> str:
  """``vision_model/encoder/layers_1/self_attn/q_proj/kernel`` → ``vision_model.encoder.layers.1.self_attn.q_proj.weight``."""
  *mods, leaf = flax_path.split("/")
  parts = [m.group(1) + "." + m.group(2) if (m := _LIST.match(p)) else p for p in mods]
  parts.append(_LEAF.get(leaf, leaf))
  return ".".join(parts)


def load_tokenizer(folder: str):
  """A ``transformers.CLIPTokenizer`` from local files (``vocab.json`` + ``merges.txt``, or the
  ``tokenizer.json`` that ``save_pretrained`` writes); never downloads."""
  from transformers import CLIPTokenizer
  has = lambda f: os.path.exists(os.path.join(folder, f))
  if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
    raise ConversionError(f"tokenizer folder {folder!r} lacks vocab.json and merges.txt (or tokenizer.json)")
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def write_tokenizer_files(folder: str | os.PathLike, model_max_length: int | None = None) -> None:
  """A tiny CLIP BPE tokenizer: the 26 letters, the letters + ``</w>``, a few merges (``red``, ``bus``) and
  the two special tokens ``<|startoftext|>`` = 62 / ``<|endoftext|>`` = 63 (the tiny CLIP configs' ``bos_token_id`` / ``eos_token_id``).
  ``model_max_length`` also writes a ``tokenizer_config.json`` (as the SD releases have)."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyz"
  merges = ["r e", "re d</w>", "b u", "bu s</w>"]
  toks = (list(letters) + [c + "</w>" for c in letters] + ["re", "red</w>", "bu", "bus</w>"])[:62]
  vocab = {t: i for i, t in enumerate(toks)}
  vocab["<|startoftext|>"] = 62
  vocab["<|endoftext|>"] = 63
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  if model_max_length is not None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"model_max_length": int(model_max_length), "tokenizer_class": "CLIPTokenizer"}, f)


def build_clip(config: Mapping[str, Any], dtype=jnp.float32, attention: str = "auto"):
  """``(CLIPModel, dummy inputs)`` from a transformers CLIPModel ``config.json`` dict; ``ConversionError`` for
  a configuration this port does not support. ``dtype``: the activation dtype (parameters stay float32);
  ``attention``: the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see ``dmd_jax.models.attention``;
  ``ValueError`` for another)."""
  check_implementation(attention)
  try:
    cfg = clip_lib.CLIPConfig.from_hf(config)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"CLIP config.json: {e}") from e
  return clip_lib.CLIPModel(cfg, dtype=dtype, attention=attention), clip_lib.clip_dummy_inputs(cfg)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], what: str = "CLIP",
                       dtype=jnp.float32, attention: str = "auto"):
  """Checks a PyTorch ``CLIPModel`` state dict against the module of ``config`` and converts it:
  ``(module, params)``."""
  module, inputs = build_clip(config, dtype, attention)
  shapes = expected_shapes(module, inputs)
  expected = {torch_key(p): torch_shape(p.rsplit("/", 1)[-1], s) for p, s in shapes.items()}
  check_state_dict(state_dict, expected, what, ignore=IGNORED)
  flat = {p: from_torch(p.rsplit("/", 1)[-1], state_dict[torch_key(p)]).reshape(s) for p, s in shapes.items()}
  for p, s in shapes.items():
    assert flat[p].shape == s, (p, flat[p].shape, s)
  return module, unflatten_params(flat)


def read_config(src_dir: str) -> dict[str, Any]:
  return read_folder_config(src_dir)


def convert_clip_model(src_dir: str | os.PathLike, dtype=jnp.float32, tokenizer_dir: str | None = None,
                       attention: str = "auto"):
  """Converts a transformers CLIPModel folder: ``(module, params, tokenizer)``.

  ``module.apply({'params': params}, pixels_nhwc, method='get_image_features')`` and
  ``module.apply({'params': params}, input_ids, method='get_text_features')`` give transformers'
  ``get_image_features`` / ``get_text_features``. ``tokenizer`` is a ``transformers.CLIPTokenizer`` read from
  ``tokenizer_dir`` (default: ``src_dir``). ``dtype`` and ``attention`` as in :func:`build_clip`.
  """
  src_dir = os.fspath(src_dir)
  if not os.path.isdir(src_dir):
    raise ConversionError(f"no such folder: {src_dir!r}")
  config = read_config(src_dir)
  build_clip(config, dtype, attention)  # fail on the config before the (slow) weight read
  tokenizer = load_tokenizer(os.fspath(tokenizer_dir) if tokenizer_dir is not None else src_dir)
  sd = {}
  for path in weight_files(src_dir, "model", "pytorch_model"):
    sd.update(load_state_dict(path))
  module, params = convert_state_dict(sd, config, f"CLIP ({src_dir})", dtype, attention)
  return module, params, tokenizer


def save_converted_clip(dst_dir: str | os.PathLike, params, config: Mapping[str, Any], tokenizer) -> None:
  """Writes ``dst/params.npz``, ``dst/config.json`` (the transformers config) and ``dst/tokenizer/``."""
  dst_dir = os.fspath(dst_dir)
  tokenizer.save_pretrained(os.path.join(dst_dir, "tokenizer"))
  save_converted(dst_dir, jax.device_get(params), config)


def load_converted_clip(src_dir: str | os.PathLike, dtype=jnp.float32, attention: str = "auto"):
  """Reads what :func:`save_converted_clip` wrote: ``(module, params, tokenizer)`` (shapes checked; ``dtype``
  and ``attention`` as in :func:`build_clip`)."""
  src_dir = os.fspath(src_dir)
  params, config = load_converted(src_dir)
  module, inputs = build_clip(config, dtype, attention)
  check_state_dict(flatten_params(params), expected_shapes(module, inputs), f"converted CLIP ({src_dir})")
  return module, params, load_tokenizer(os.path.join(src_dir, "tokenizer"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True, help="transformers CLIPModel folder")
  parser.add_argument("--dst", required=True, help="output folder for the converted model")
  parser.add_argument("--tokenizer", default=None, help="tokenizer folder if not in --src")


def run(args: argparse.Namespace) -> None:
  module, params, tokenizer = convert_clip_model(args.src, tokenizer_dir=args.tokenizer)
  save_converted_clip(args.dst, params, read_config(args.src), tokenizer)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  cfg = module.config
  print(f"CLIP: {n:,} parameters (vision {cfg.vision.num_hidden_layers}x{cfg.vision.hidden_size}, patch "
        f"{cfg.vision.patch_size}, {cfg.vision.image_size} px; text {cfg.text.num_hidden_layers}x"
        f"{cfg.text.hidden_size}; projection {cfg.projection_dim}) -> {args.dst}")


# ---------------------------------------------------------------------------------------------------------
# A tiny random-weight CLIPModel (the stand-in CLIP-score model of ``configs/coco.py:tiny``), written without
# torch in the transformers layout and converted like a real one
# ---------------------------------------------------------------------------------------------------------

TINY_CLIP_MODEL = dict(
    model_type="clip", projection_dim=16,
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_act="quick_gelu",
                     bos_token_id=62, eos_token_id=63, pad_token_id=63),
    vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="quick_gelu"))


def write_random_converted_clip(dst: str | os.PathLike, seed: int = 0, config: Mapping[str, Any] | None = None
                                ) -> str:
  """Writes a random ``CLIPModel`` folder (``config.json``, ``model.safetensors``, the tiny tokenizer of
  :func:`write_tokenizer_files`) to ``<dst>-source`` and converts it into ``dst``. Returns
  ``dst``."""

  dst = os.fspath(dst)
  src = dst + "-source"
  config = dict(config or TINY_CLIP_MODEL)
  module, inputs = build_clip(config)
  shapes = {torch_key(p): torch_shape(p.rsplit("/", 1)[-1], s) for p, s in expected_shapes(module, inputs).items()}
  os.makedirs(src, exist_ok=True)
  save_file(random_state_dict(shapes, seed), os.path.join(src, "model.safetensors"))
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  write_tokenizer_files(src, config["text_config"]["max_position_embeddings"])
  module, params, tokenizer = convert_clip_model(src)
  save_converted_clip(dst, params, config, tokenizer)
  return dst
