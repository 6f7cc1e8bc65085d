"""Shared pieces of the weight converters: reading state dicts, checking them, PyTorch → Flax layouts,
and writing converted parameters to a folder.

A converted network lives in a folder holding ``params.npz`` (the Flax parameter tree, flattened with
``/``-joined keys) and ``config.json`` (what is needed to rebuild the module). Both are written atomically
(``dmd_jax.io``: a temporary name, then a rename), ``config.json`` last, so an interrupted conversion never
leaves a half-written folder that looks complete. Folders and state-dict files may be local or ``gs://``.
"""
from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from safetensors.numpy import load, load_file

from dmd_jax import io


class ConversionError(ValueError):
  """A checkpoint does not match what the converter expects; the message names the problem."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat state dict ``{name: array}`` from ``.npz``, ``.safetensors`` or (with torch) ``.pt/.pth/.bin``.

  Arrays come back as numpy; float16/bfloat16 weights are upcast to float32. A remote (``gs://``) file is
  read into memory.
  """
  path = os.fspath(path)
  if not io.exists(path):
    raise ConversionError(f"no such file: {path!r}")
  remote = io.is_remote(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    sd = io.load_npz(path)
  elif ext == ".safetensors":
    data = io.read_bytes(path) if remote else None
    try:
      sd = load(data) if remote else load_file(path)
    except Exception as e:  # bfloat16 has no numpy dtype: fall back to torch when present.
      try:
        import torch  # noqa: F401
        from safetensors.torch import load as torch_load
        from safetensors.torch import load_file as torch_load_file
      except ImportError:
        raise ConversionError(f"cannot read {path!r} without torch: {e}") from e
      sd = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in (torch_load(data) if remote else torch_load_file(path)).items()}
  elif ext in (".pt", ".pth", ".bin", ".ckpt"):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(
          f"{path!r} is a PyTorch file and torch is not installed; install torch, or save the state dict "
          "as .npz / .safetensors") from e
    obj = torch.load(BytesIO(io.read_bytes(path)) if remote else path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    sd = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}
  else:
    raise ConversionError(
        f"unknown file type {ext!r} for {path!r}: expected .npz, .safetensors, .pt, .pth or .bin")
  return {k: _as_float32(v) for k, v in sd.items()}


def _as_float32(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v)
  if v.dtype.kind == "f" and v.dtype != np.float32:
    return v.astype(np.float32)
  return v


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                     what: str, ignore: Iterable[str] = ()) -> None:
  """Raises ``ConversionError`` naming every missing, unexpected and mis-shaped key.

  ``expected`` maps each key to its PyTorch-layout shape; keys in ``ignore`` may be present or absent.
  """
  ignore = set(ignore)
  got = {k for k in state_dict if k not in ignore}
  want = set(expected)
  missing = sorted(want - got)
  extra = sorted(got - want)
  bad = sorted(f"{k}: expected {tuple(expected[k])}, got {tuple(np.shape(state_dict[k]))}"
               for k in want & got if tuple(np.shape(state_dict[k])) != tuple(expected[k]))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}"
                    + (" ..." if len(missing) > 20 else ""))
  if extra:
    problems.append(f"unexpected keys ({len(extra)}): {', '.join(extra[:20])}"
                    + (" ..." if len(extra) > 20 else ""))
  if bad:
    problems.append(f"wrong shapes ({len(bad)}): {'; '.join(bad[:20])}" + (" ..." if len(bad) > 20 else ""))
  if problems:
    raise ConversionError(f"{what}: " + " | ".join(problems))


def conv_kernel(w_oihw: np.ndarray) -> np.ndarray:
  """PyTorch conv weight ``[O, I, H, W]`` → Flax kernel ``[H, W, I, O]``."""
  return np.transpose(np.asarray(w_oihw, np.float32), (2, 3, 1, 0))


def linear_kernel(w_oi: np.ndarray) -> np.ndarray:
  """PyTorch linear weight ``[out, in]`` → Flax kernel ``[in, out]``."""
  return np.transpose(np.asarray(w_oi, np.float32), (1, 0))


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax parameter named ``leaf``: kernels HWIO → OIHW and [in, out] → [out, in]."""
  if leaf == "kernel" and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if leaf == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor → the Flax parameter named ``leaf`` (the inverse of ``torch_shape``), float32."""
  value = np.asarray(value, np.float32)
  if leaf == "kernel" and value.ndim == 4:
    return conv_kernel(value)
  if leaf == "kernel" and value.ndim == 2:
    return linear_kernel(value)
  return value


def to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """A Flax parameter named ``leaf`` → its PyTorch tensor (float32, C-contiguous): the inverse of
  ``from_torch`` (kernels HWIO → OIHW and [in, out] → [out, in]; everything else as it is)."""
  value = np.asarray(value, np.float32)
  if leaf == "kernel" and value.ndim == 4:
    value = np.transpose(value, (3, 2, 0, 1))
  elif leaf == "kernel" and value.ndim == 2:
    value = np.transpose(value, (1, 0))
  return np.ascontiguousarray(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in params.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten_params(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


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


def save_converted(dst_dir: str | os.PathLike, params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
  """Writes ``params.npz`` then ``config.json`` (the latter marks the folder complete), each atomically."""
  dst_dir = os.fspath(dst_dir)
  io.write_npz(io.join(dst_dir, "params.npz"), **flatten_params(params))
  io.write_json(io.join(dst_dir, "config.json"), dict(config), indent=1, sort_keys=True)


def load_converted(src_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads what ``save_converted`` wrote: ``(params, config)``."""
  src_dir = os.fspath(src_dir)
  cfg_path = io.join(src_dir, "config.json")
  par_path = io.join(src_dir, "params.npz")
  if not (io.exists(cfg_path) and io.exists(par_path)):
    raise ConversionError(
        f"{src_dir!r} is not a converted network folder (expected params.npz and config.json; "
        "run `python -m dmd_jax.convert ...` first)")
  return unflatten_params(io.load_npz(par_path)), io.read_json(cfg_path)


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """A random state dict in PyTorch layout for ``shapes`` (key → shape), for the ``:tiny`` configs' stand-in
  networks: weights of rank ≥ 2 He-scaled normal, rank-1 weights (norm scales) and running variances 1, the rest 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if len(shape) >= 2:
      out[key] = (rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    elif key.endswith(("running_var", "weight")):   # rank-1 weights are norm scales
      out[key] = np.ones(shape, np.float32)
    else:
      out[key] = np.zeros(shape, np.float32)
  return out


def write_random_network(dst: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]], convert_file,
                         seed: int = 0, **convert_kwargs):
  """Writes ``random_state_dict(shapes)`` as ``<dst>-source/state_dict.npz`` and converts it into ``dst`` with
  the network's own ``convert_file`` — the path a real checkpoint takes."""
  dst = os.fspath(dst)
  src = io.join(dst + "-source", "state_dict.npz")
  io.write_npz(src, **random_state_dict(shapes, seed))
  return convert_file(src, dst, **convert_kwargs)


def read_folder_config(folder: str) -> dict[str, Any]:
  """``<folder>/config.json`` of a diffusers / transformers model folder; a clear error when it is missing."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"missing config: {path!r}")
  with open(path) as f:
    return json.load(f)


def weight_files(folder: str, stem: str, torch_stem: str) -> list[str]:
  """The weight file(s) of a diffusers / transformers model folder: ``<stem>.safetensors`` first, then the
  PyTorch pickle ``<torch_stem>.bin``; sharded checkpoints through their ``.index.json``; ``fp16`` variants
  last."""
  for s, t in ((stem, torch_stem), (stem + ".fp16", torch_stem + ".fp16")):
    for name in (s + ".safetensors", t + ".bin"):
      if os.path.exists(os.path.join(folder, name)):
        return [os.path.join(folder, name)]
    for name in (s + ".safetensors.index.json", t + ".bin.index.json"):
      idx = os.path.join(folder, name)
      if os.path.exists(idx):
        with open(idx) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, sh) for sh in shards]
  raise ConversionError(f"no weights in {folder!r} (expected {stem}.safetensors or {torch_stem}.bin)")
