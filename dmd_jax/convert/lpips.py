"""LPIPS v0.1 VGG weights → Flax parameters for ``dmd_jax.models.lpips.LPIPS``.

Two namings of the VGG16 trunk are accepted:

- the ``lpips`` package's ``net.slice{k}.{idx}.weight/bias`` (k = 1..5, idx the torchvision index);
- torchvision's ``vgg16`` (ImageNet, ``vgg16-397923af.pth``): ``features.{idx}.weight/bias``; ``classifier.*``
  is dropped.

The linear calibration weights come, in this order of preference, from the ``lin`` argument, from the state
dict (``lin{k}.model.1.weight`` ``[1, C, 1, 1]``, or its ``lins.{k}.model.1.weight`` duplicate, or a 1-D
``lin{k}``), or from the v0.1 weights shipped in ``dmd_jax/assets/lpips_v0.1_vgg_lin.npz`` (BSD-2-Clause,
see ``LICENSE-lpips.txt`` beside it).

    python -m dmd_jax.convert lpips --src=vgg16-397923af.pth --dst=weights/lpips_vgg
"""
from __future__ import annotations

import importlib.resources
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from dmd_jax.convert import check_network
from dmd_jax.convert.common import (ConversionError, check_state_dict, conv_kernel, load_converted,
                                    load_state_dict, save_converted)
from dmd_jax.models.lpips import LPIPS, TAP_CHANNELS, VGG16_STAGES, vgg16_conv_names

HELP = "LPIPS v0.1 VGG16 (torchvision vgg16 .pth or lpips state dict; v0.1 lin weights shipped) -> Flax"
NETWORK = "lpips_vgg"
LIN_ASSET = "lpips_v0.1_vgg_lin.npz"


def _vgg16_layout() -> list[tuple[str, int, int, int, int]]:
  """``(flax name, torchvision index, LPIPS slice, in channels, out channels)`` per conv of VGG16 features."""
  out, idx, cin = [], 0, 3
  names = iter(vgg16_conv_names())
  for s, (c, n) in enumerate(VGG16_STAGES):
    if s > 0:
      idx += 1  # the max-pool
    for _ in range(n):
      out.append((next(names), idx, s + 1, cin, c))
      idx += 2  # conv, relu
      cin = c
  return out


def trunk_expected_shapes(naming: str) -> dict[str, tuple[int, ...]]:
  """The VGG16 trunk's state-dict keys and PyTorch shapes in ``naming`` ('lpips' or 'torchvision')."""
  if naming not in ("lpips", "torchvision"):
    raise ValueError(f"LPIPS trunk naming must be 'lpips' or 'torchvision', got {naming!r}")
  exp = {}
  for _, idx, s, cin, cout in _vgg16_layout():
    prefix = f"net.slice{s}.{idx}" if naming == "lpips" else f"features.{idx}"
    exp[f"{prefix}.weight"] = (cout, cin, 3, 3)
    exp[f"{prefix}.bias"] = (cout,)
  return exp



def default_lin_weights() -> dict[str, np.ndarray]:
  """The LPIPS v0.1 VGG linear weights shipped with the package: ``{'lin0': [64], ..., 'lin4': [512]}``."""
  res = importlib.resources.files("dmd_jax").joinpath("assets", LIN_ASSET)
  with res.open("rb") as f, np.load(f, allow_pickle=False) as z:
    return {k: np.asarray(z[k], np.float32) for k in z.files}


# Namings of the linear weights: (regex, key template, shape of channel count c).
_LIN_NAMINGS = (
    (r"lin(\d)\.model\.1\.weight", "lin{k}.model.1.weight", lambda c: (1, c, 1, 1)),   # lpips package
    (r"lins\.(\d)\.model\.1\.weight", "lins.{k}.model.1.weight", lambda c: (1, c, 1, 1)),  # its duplicate
    (r"lin(\d)", "lin{k}", lambda c: (c,)),                                            # our asset file
)


def _lin_weights(sd: Mapping[str, Any], what: str) -> dict[int, np.ndarray] | None:
  """Linear weights in ``sd`` (the first naming present wins) as 1-D arrays; None when there are none."""
  for pattern, template, shape in _LIN_NAMINGS:
    found = [k for k in sd if re.fullmatch(pattern, k)]
    if not found:
      continue
    expected = {template.format(k=k): shape(c) for k, c in enumerate(TAP_CHANNELS)}
    check_state_dict({k: sd[k] for k in found}, expected, f"{what} (linear layers)")
    return {k: np.asarray(sd[template.format(k=k)], np.float32).reshape(-1) for k in range(len(TAP_CHANNELS))}
  return None


def _is_lin_key(k: str) -> bool:
  return any(re.fullmatch(p, k) for p, _, _ in _LIN_NAMINGS)


def convert_state_dict(state_dict: Mapping[str, Any], lin: Mapping[str, Any] | None = None,
                       dtype: Any = jnp.float32) -> tuple[LPIPS, dict[str, Any]]:
  """VGG16 trunk (LPIPS or torchvision naming) [+ linear weights] → ``(module, params)``.

  ``module.apply({'params': params}, x0, x1) -> [N]`` for NHWC images in [-1, 1]. ``lin`` optionally gives
  the linear weights as a separate state dict (any of the accepted namings). ``dtype`` sets the module's
  activation dtype (parameters stay float32).
  """
  keys = list(state_dict)
  if any(k.startswith("net.slice") for k in keys):
    naming = "lpips"
  elif any(k.startswith("features.") for k in keys):
    naming = "torchvision"
  else:
    raise ConversionError("LPIPS VGG16: no VGG16 trunk found (expected keys 'net.slice{k}.{idx}.weight' of "
                          f"the lpips package or 'features.{{idx}}.weight' of torchvision vgg16); got "
                          f"{', '.join(sorted(keys)[:10])}{' ...' if len(keys) > 10 else ''}")
  what = f"LPIPS VGG16 ({naming} naming)"
  ignore = [k for k in keys if _is_lin_key(k) or (naming == "torchvision" and k.startswith("classifier."))]
  check_state_dict(state_dict, trunk_expected_shapes(naming), what, ignore=ignore)

  lin_w = _lin_weights(lin, "LPIPS lin weights") if lin is not None else None
  if lin_w is None:
    lin_w = _lin_weights(state_dict, what)
  if lin_w is None:
    lin_w = {int(k[3:]): v for k, v in default_lin_weights().items()}
  for k, w in lin_w.items():
    if np.any(w < 0):
      raise ConversionError(f"LPIPS lin{k} has negative weights (min {w.min():.3g}); LPIPS v0.1 calibration "
                            "weights are non-negative — wrong file?")

  params: dict[str, Any] = {"vgg": {}}
  for name, idx, s, _, _ in _vgg16_layout():
    prefix = f"net.slice{s}.{idx}" if naming == "lpips" else f"features.{idx}"
    params["vgg"][name] = {"kernel": conv_kernel(state_dict[f"{prefix}.weight"]),
                           "bias": np.asarray(state_dict[f"{prefix}.bias"], np.float32)}
  for k in range(len(TAP_CHANNELS)):
    params[f"lin{k}"] = {"kernel": lin_w[k].reshape(1, 1, -1, 1).astype(np.float32)}
  return LPIPS(dtype=dtype), params


def convert_file(src: str | os.PathLike, dst: str | os.PathLike,
                 lin: str | os.PathLike | None = None) -> None:
  """Converts a VGG16 state dict (torchvision ``.pth`` with torch, or ``.npz`` / ``.safetensors``) to ``dst``.

  ``lin``: optional file with the linear weights (e.g. the lpips package's ``weights/v0.1/vgg.pth``);
  default: those in the state dict, else the v0.1 weights shipped with dmd_jax.
  """
  lin_sd = load_state_dict(lin) if lin is not None else None
  _, params = convert_state_dict(load_state_dict(src), lin=lin_sd)
  save_converted(dst, params, {"network": NETWORK, "source": os.path.basename(os.fspath(src))})


def load_converted_lpips(src_dir: str | os.PathLike,
                         dtype: Any = jnp.float32) -> tuple[LPIPS, dict[str, Any]]:
  """Reads a folder written by ``convert_file``: ``(module, params)``."""
  params, config = load_converted(src_dir)
  check_network(config, NETWORK, src_dir)
  return LPIPS(dtype=dtype), params


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m dmd_jax.convert lpips --src=... --dst=... [--lin=...]
# ---------------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
  parser.add_argument("--src", required=True,
                      help="torchvision vgg16 .pth (needs torch) or an .npz/.safetensors state dict "
                           "(torchvision 'features.*' or lpips 'net.slice*' naming)")
  parser.add_argument("--dst", required=True, help="output folder (params.npz + config.json)")
  parser.add_argument("--lin", default=None,
                      help="optional file with the linear weights (lpips weights/v0.1/vgg.pth); default: "
                           "those in --src, else the v0.1 weights shipped with dmd_jax")


def run(args) -> None:
  convert_file(args.src, args.dst, lin=args.lin)
  print(f"LPIPS VGG16: {args.src} -> {args.dst}")
