"""Shared pieces of the weight converters: reading state dicts, checking them, PyTorch → Flax layouts,
and writing converted parameters to a folder.

A converted network lives in a folder holding ``params.npz`` (the Flax parameter tree, flattened with
``/``-joined keys) and ``config.json`` (what is needed to rebuild the module). Both are written to a
temporary name first and renamed into place, so an interrupted conversion never leaves a half-written
folder that looks complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not match what the converter expects; the message names the problem."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat state dict ``{name: array}`` from ``.npz``, ``.safetensors`` or (with torch) ``.pt/.pth/.bin``.

  Arrays come back as numpy; float16/bfloat16 weights are upcast to float32.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConversionError(f"no such file: {path!r}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      sd = {k: f[k] for k in f.files}
  elif ext == ".safetensors":
    from safetensors.numpy import load_file
    try:
      sd = load_file(path)
    except Exception as e:  # bfloat16 has no numpy dtype: fall back to torch when present.
      try:
        import torch  # noqa: F401
        from safetensors.torch import load_file as torch_load_file
      except ImportError:
        raise ConversionError(f"cannot read {path!r} without torch: {e}") from e
      sd = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in torch_load_file(path).items()}
  elif ext in (".pt", ".pth", ".bin", ".ckpt"):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(
          f"{path!r} is a PyTorch file and torch is not installed; install torch, or save the state dict "
          "as .npz / .safetensors") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
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


def _atomic_write(path: str, write_fn) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_converted(dst_dir: str | os.PathLike, params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
  """Writes ``params.npz`` then ``config.json`` (the latter marks the folder complete)."""
  dst_dir = os.fspath(dst_dir)
  flat = flatten_params(params)

  def write_npz(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **flat)

  def write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(dict(config), f, indent=1, sort_keys=True)

  _atomic_write(os.path.join(dst_dir, "params.npz"), write_npz)
  _atomic_write(os.path.join(dst_dir, "config.json"), write_json)


def load_converted(src_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads what ``save_converted`` wrote: ``(params, config)``."""
  src_dir = os.fspath(src_dir)
  cfg_path = os.path.join(src_dir, "config.json")
  par_path = os.path.join(src_dir, "params.npz")
  if not (os.path.exists(cfg_path) and os.path.exists(par_path)):
    raise ConversionError(
        f"{src_dir!r} is not a converted network folder (expected params.npz and config.json; "
        "run `python -m dmd_jax.convert ...` first)")
  with open(cfg_path) as f:
    config = json.load(f)
  with np.load(par_path, allow_pickle=False) as f:
    params = unflatten_params({k: f[k] for k in f.files})
  return params, config


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
  the family's own ``convert_file`` — the path a real checkpoint takes."""
  dst = os.fspath(dst)
  src = os.path.join(dst + "-source", "state_dict.npz")
  os.makedirs(os.path.dirname(src), exist_ok=True)
  np.savez(src, **random_state_dict(shapes, seed))
  return convert_file(src, dst, **convert_kwargs)
