"""FID Inception-v3 weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) → Flax parameters.

The state dict uses torchvision ``inception_v3`` naming: ``Mixed_5b.branch5x5_1.conv.weight``,
``...bn.weight/bias/running_mean/running_var``. It maps one to one onto
``dmd_jax.models.inception.InceptionV3FID``: ``conv.weight`` (OIHW) → ``conv/kernel`` (HWIO), ``bn.weight`` →
``bn/scale``, ``bn.bias`` → ``bn/bias``, ``bn.running_mean`` → ``bn/mean``, ``bn.running_var`` → ``bn/var``.
``fc.*`` (the 1008-way logits), ``AuxLogits.*`` and ``*.num_batches_tracked`` are dropped: FID reads the
pool features.

    python -m dmd_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth --dst=weights/inception_fid

``.pth`` needs torch; a state dict saved as ``.npz`` or ``.safetensors`` converts without it.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.convert import check_network
from dmd_jax.convert.common import (ConversionError, check_state_dict, conv_kernel, load_converted,
                                    load_state_dict, save_converted, torch_shape)
from dmd_jax.models.inception import InceptionV3FID

HELP = "FID Inception-v3 (pytorch-fid pt_inception-2015-12-05 .pth, torchvision naming) -> Flax folder"
NETWORK = "inception_fid"
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _is_ignored(key: str) -> bool:
  return (key.startswith("fc.") or key.startswith("AuxLogits.") or key.endswith("num_batches_tracked"))


@functools.lru_cache(maxsize=None)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax parameter path → shape, from an abstract ``init`` (no FLOPs spent)."""
  module = InceptionV3FID()
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_name(path: tuple[str, ...]) -> str:
  *mods, leaf = path
  if leaf == "kernel":
    return ".".join(mods) + ".weight"
  return ".".join(mods) + "." + _BN_NAMES[leaf]


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """The PyTorch state-dict keys and shapes the converter expects (``fc.*`` etc. excluded)."""
  return {_torch_name(p): torch_shape(p[-1], s) for p, s in _param_shapes().items()}


def convert_state_dict(state_dict: Mapping[str, Any]) -> tuple[InceptionV3FID, dict[str, Any]]:
  """PyTorch state dict (torchvision naming) → ``(module, params)``; ``module.apply({'params': params}, x)``.

  Raises ``ConversionError`` naming every missing, unexpected or mis-shaped key.
  """
  check_state_dict(state_dict, expected_shapes(), "FID Inception-v3",
                   ignore=[k for k in state_dict if _is_ignored(k)])
  params: dict[str, Any] = {}
  for path in _param_shapes():
    w = np.asarray(state_dict[_torch_name(path)], np.float32)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = conv_kernel(w) if path[-1] == "kernel" else w
  return InceptionV3FID(precision=jax.lax.Precision.HIGHEST), params


def convert_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Converts pytorch-fid's ``.pth`` (with torch) or a ``.npz`` / ``.safetensors`` state dict into ``dst``."""
  _, params = convert_state_dict(load_state_dict(src))
  save_converted(dst, params, {"network": NETWORK, "source": os.path.basename(os.fspath(src))})


def load_converted_inception(src_dir: str | os.PathLike) -> tuple[InceptionV3FID, dict[str, Any]]:
  """Reads a folder written by ``convert_file``: ``(module, params)`` with ``precision=HIGHEST``."""
  params, config = load_converted(src_dir)
  check_network(config, NETWORK, src_dir)
  got = {tuple(k.key for k in path): tuple(np.shape(leaf))
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if got != _param_shapes():
    raise ConversionError(f"{os.fspath(src_dir)!r}: parameters do not match InceptionV3FID "
                          "(converted by another version?)")
  return InceptionV3FID(precision=jax.lax.Precision.HIGHEST), params


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m dmd_jax.convert inception --src=... --dst=...
# ---------------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
  parser.add_argument("--src", required=True,
                      help="pytorch-fid pt_inception-2015-12-05-*.pth (needs torch), or a .npz/.safetensors "
                           "state dict in torchvision inception_v3 naming")
  parser.add_argument("--dst", required=True, help="output folder (params.npz + config.json)")


def run(args) -> None:
  convert_file(args.src, args.dst)
  print(f"FID Inception-v3: {args.src} -> {args.dst}")
