"""EDM networks (NVlabs/edm ``EDMPrecond`` with SongUNet / DhariwalUNet) → ``dmd_jax.models.edm`` parameters.

Sources:

- an EDM network pickle (``edm-imagenet-64x64-cond-adm.pkl``, ``network-snapshot-*.pkl``), read *without*
  running the Python source it embeds (see ``load_edm_pickle``; needs torch to rebuild the tensors);
- a state dict (``.npz`` / ``.safetensors``, EDMPrecond's keys ``model.enc.16x16_conv.weight``, ...) plus the
  network's ``init_kwargs`` as JSON — the torch-free path.

``python -m dmd_jax.convert edm --src=FILE --dst=DIR [--init_kwargs=JSON]`` writes ``DIR/params.npz`` and
``DIR/config.json`` (``{"network": "edm", "init_kwargs": ...}``); ``load_converted_edm(DIR)`` rebuilds
``(module, params)``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import io as dio
from dmd_jax.convert import check_network, common
from dmd_jax.convert.common import (ConversionError, check_state_dict, load_converted, load_state_dict,
                                    save_converted)
from dmd_jax.models import edm as edm_models
from dmd_jax.models.attention import check_implementation

NETWORK = "edm"


# ---------------------------------------------------------------------------------------------------------------
# State dict → Flax parameters.
# ---------------------------------------------------------------------------------------------------------------

def torch_key(path: tuple[str, ...]) -> str:
  """Flax path ``('model', 'enc_16x16_block0', 'conv0', 'kernel')`` → ``model.enc.16x16_block0.conv0.weight``."""
  parts = []
  for p in path[:-1]:
    if p.startswith(("enc_", "dec_")):
      parts.extend(p.split("_", 1))
    else:
      parts.append(p)
  leaf = path[-1]
  parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def expected_state_dict(module: edm_models.EDMPrecond):
  """``(params_spec, buffer_spec)``: for every Flax parameter its ``(torch key, torch shape)``, and the torch
  shapes of the ``resample_filter`` buffers, all read from the module's own (abstract) ``init``."""
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *edm_models.init_inputs(module)))
  params = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    names = _path_names(path)
    params[names] = (torch_key(names), common.torch_shape(names[-1], leaf.shape))
  buffers = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(edm_models.TORCH_BUFFERS, {}))[0]:
    buffers[torch_key(_path_names(path))] = tuple(leaf.shape)
  return params, buffers


def convert_state_dict(state_dict: Mapping[str, np.ndarray], init_kwargs: Mapping[str, Any]):
  """EDMPrecond state dict (PyTorch keys and layouts) + its ``init_kwargs`` → ``(module, params)``.

  Every key and shape is checked against the module built from ``init_kwargs``. Dropped: only the
  ``*.resample_filter`` buffers, which are fixed functions of ``init_kwargs['resample_filter']``
  (``outer(f, f) / sum(f)^2``); their values are verified before they are dropped. Kept: the NCSN++ Fourier
  buffer ``model.map_noise.freqs`` (random data), as the parameter ``model/map_noise/freqs``.
  """
  try:
    module = edm_models.edm_module_from_kwargs(init_kwargs)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  params_spec, buffer_spec = expected_state_dict(module)
  expected = {k: s for k, s in params_spec.values()}
  expected.update(buffer_spec)
  what = f"EDM {module.model_type} state dict"
  check_state_dict(state_dict, expected, what)

  f = edm_models.resample_filter_2d(init_kwargs.get("resample_filter", (1, 1))
                                    if module.model_type == "SongUNet" else (1, 1))
  for key in buffer_spec:
    got = np.asarray(state_dict[key], np.float32).reshape(f.shape)
    if not np.allclose(got, f, rtol=1e-3, atol=1e-6):  # fp16 storage of e.g. 1/64 is exact; allow rounding
      raise ConversionError(f"{what}: {key} = {got.tolist()} does not match the filter derived from "
                            f"init_kwargs ({f.tolist()})")

  params: dict[str, Any] = {}
  for names, (key, _) in params_spec.items():
    node = params
    for p in names[:-1]:
      node = node.setdefault(p, {})
    node[names[-1]] = common.from_torch(names[-1], state_dict[key])
  return module, params


def _resample_filter(module: edm_models.EDMPrecond, init_kwargs: Mapping[str, Any]) -> np.ndarray:
  """The 2-D ``resample_filter`` buffer EDM derives from ``init_kwargs`` (DhariwalUNet: always [1, 1])."""
  return edm_models.resample_filter_2d(init_kwargs.get("resample_filter", (1, 1))
                                       if module.model_type == "SongUNet" else (1, 1))


def to_torch_state_dict(params: Mapping[str, Any], init_kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`convert_state_dict`: Flax parameters of the EDMPrecond built from ``init_kwargs`` →
  its PyTorch state dict (EDM's names and layouts, float32), including the ``*.resample_filter`` buffers
  derived from ``init_kwargs`` — what ``EDMPrecond(**init_kwargs).load_state_dict`` takes, and what
  :func:`convert_state_dict` (``python -m dmd_jax.convert edm``) reads back. Every parameter is checked
  against the module (a missing, extra or mis-shaped one is a ``ConversionError`` naming it)."""
  try:
    module = edm_models.edm_module_from_kwargs(init_kwargs)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  params_spec, buffer_spec = expected_state_dict(module)
  flat = {_path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted("/".join(n) for n in set(params_spec) - set(flat))
  extra = sorted("/".join(n) for n in set(flat) - set(params_spec))
  if missing or extra:
    raise ConversionError(f"EDM {module.model_type} parameters do not match init_kwargs: missing "
                          f"{missing[:20] or 'none'}, unexpected {extra[:20] or 'none'}")
  out: dict[str, np.ndarray] = {}
  for names, (key, shape) in params_spec.items():
    value = common.to_torch(names[-1], flat[names])
    if value.shape != tuple(shape):
      raise ConversionError(f"EDM parameter {'/'.join(names)}: expected PyTorch shape {tuple(shape)}, got "
                            f"{value.shape}")
    out[key] = value
  f = _resample_filter(module, init_kwargs)
  for key, shape in buffer_spec.items():
    out[key] = np.ascontiguousarray(f.reshape(shape), np.float32)
  return out


def count_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------------------------
# EDM network pickles, read without executing them.
# ---------------------------------------------------------------------------------------------------------------

class _Persistent:
  """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` becomes: the class name and the
  object's ``__dict__``; the embedded source code is never looked at."""

  def __init__(self, meta):
    if not isinstance(meta, dict) or "state" not in meta:
      raise ConversionError("malformed persistent object in the EDM pickle (no meta['state'])")
    self.class_name = meta.get("class_name")
    self.state = meta["state"] if meta["state"] is not None else {}


class _ModuleShell:
  """Stand-in for plain ``torch.nn`` containers (``ModuleDict`` ...): keeps the pickled ``__dict__``."""

  def __init__(self, *args, **kwargs):
    self.state = {}

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {}


class _EasyDict(dict):
  pass


def _reconstruct_persistent_obj(meta):
  return _Persistent(meta)


def _safe_torch_globals():
  try:
    import torch
    import torch._utils
  except ImportError as e:
    raise ConversionError("reading an EDM .pkl needs torch to rebuild its tensors; install torch, or convert "
                          "from a .npz / .safetensors state dict plus --init_kwargs=JSON") from e

  def load_from_bytes(b):  # torch.storage._load_from_bytes, but with torch's weights-only unpickler
    return torch.load(io.BytesIO(b), weights_only=True)

  allowed = {
      ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
      ("torch.storage", "_load_from_bytes"): load_from_bytes,
      ("torch", "Size"): torch.Size,
  }
  for name in ("_rebuild_parameter_with_state", "_rebuild_tensor_v3"):
    if hasattr(torch._utils, name):
      allowed[("torch._utils", name)] = getattr(torch._utils, name)
  for name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
               "ByteStorage", "BoolStorage", "UntypedStorage"):
    if hasattr(torch, name):
      allowed[("torch", name)] = getattr(torch, name)
  for dt in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"):
    allowed[("torch", dt)] = getattr(torch, dt)
  return allowed


_CONTAINERS = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
}
_TORCH_SHELLS = {"ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList"}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only tensor-rebuild globals, plain containers, torch.nn containers (as inert shells) and
  ``_reconstruct_persistent_obj`` (which keeps ``meta['state']``); anything else is refused."""

  def __init__(self, f, torch_globals):
    super().__init__(f)
    self._torch_globals = torch_globals

  def find_class(self, module, name):
    if (module, name) in _CONTAINERS:
      return _CONTAINERS[(module, name)]
    if (module, name) in self._torch_globals:
      return self._torch_globals[(module, name)]
    if module == "torch.nn.modules.container" and name in _TORCH_SHELLS:
      return _ModuleShell
    raise ConversionError(
        f"refusing to load {module}.{name} from the pickle: only EDM network pickles (torch tensors, plain "
        "containers, torch_utils.persistence objects) are read, and nothing in the file is executed")


def _to_numpy(t) -> np.ndarray:
  t = t.detach().cpu()
  return (t.float() if t.is_floating_point() else t).numpy()


def _walk(obj, prefix: str, out: dict) -> None:
  """``state_dict()`` order: this module's parameters, its persistent buffers, then its submodules."""
  state = obj.state
  non_persistent = set(state.get("_non_persistent_buffers_set", ()) or ())
  for name, p in (state.get("_parameters") or {}).items():
    if p is not None:
      out[prefix + name] = _to_numpy(p)
  for name, b in (state.get("_buffers") or {}).items():
    if b is not None and name not in non_persistent:
      out[prefix + name] = _to_numpy(b)
  for name, m in (state.get("_modules") or {}).items():
    if m is not None:
      _walk(m, f"{prefix}{name}.", out)


def _read_edm_pickle(path):
  torch_globals = _safe_torch_globals()
  with open(path, "rb") as f:
    try:
      data = _RestrictedUnpickler(f, torch_globals).load()
    except ConversionError:
      raise
    except Exception as e:
      raise ConversionError(f"cannot read {path!r} as an EDM network pickle: {type(e).__name__}: {e}") from e
  net = data
  if isinstance(data, dict):
    for key in ("ema", "net"):
      if key in data:
        net = data[key]
        break
    else:
      raise ConversionError(f"{path!r}: expected an EDM snapshot dict with 'ema', got keys {sorted(data)}")
  if not isinstance(net, _Persistent):
    raise ConversionError(f"{path!r}: the network is not a torch_utils.persistence object "
                          f"(got {type(net).__name__})")
  if net.class_name != "EDMPrecond":
    raise ConversionError(f"{path!r}: network class {net.class_name!r} is not supported (only EDMPrecond; "
                          "VPPrecond / VEPrecond / iDDPMPrecond baselines use other preconditionings)")
  state_dict: dict[str, np.ndarray] = {}
  _walk(net, "", state_dict)
  init_kwargs = net.state.get("_init_kwargs")
  if init_kwargs is not None:
    try:
      init_kwargs = json.loads(json.dumps(dict(init_kwargs)))  # plain JSON types (tuples → lists)
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{path!r}: the network's init_kwargs are not plain values: {e}") from e
  return state_dict, init_kwargs


def load_edm_pickle(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads an EDM network pickle → ``(state_dict, init_kwargs)`` of its ``ema`` network, without executing
  the source code the pickle embeds. Needs torch (to rebuild the tensors)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConversionError(f"no such file: {path!r}")
  state_dict, init_kwargs = _read_edm_pickle(path)
  if not init_kwargs:
    raise ConversionError(f"{path!r}: the network has no init_kwargs (not saved through "
                          "torch_utils.persistence?); convert its state dict with an --init_kwargs JSON instead")
  return state_dict, init_kwargs


# ---------------------------------------------------------------------------------------------------------------
# Files and folders.
# ---------------------------------------------------------------------------------------------------------------

def _read_init_kwargs(init_kwargs) -> dict[str, Any]:
  if isinstance(init_kwargs, Mapping):
    return dict(init_kwargs)
  path = os.fspath(init_kwargs)
  if not os.path.exists(path):
    raise ConversionError(f"no such init_kwargs file: {path!r}")
  with open(path) as f:
    try:
      kw = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path!r} is not valid JSON: {e}") from e
  if not isinstance(kw, dict):
    raise ConversionError(f"{path!r} must hold a JSON object of EDM init_kwargs")
  return kw


def convert_file(src, dst, init_kwargs=None):
  """Converts ``src`` (``.pkl`` EDM pickle, or ``.npz`` / ``.safetensors`` state dict with ``init_kwargs``, a
  dict or a JSON path) and writes ``dst/params.npz`` + ``dst/config.json``. For a ``.pkl``, ``init_kwargs``
  overrides the pickle's own. Returns ``(module, params)``."""
  src = os.fspath(src)
  ext = os.path.splitext(src)[1].lower()
  if ext == ".pkl":
    if not os.path.exists(src):
      raise ConversionError(f"no such file: {src!r}")
    if init_kwargs is None:
      state_dict, kw = load_edm_pickle(src)
    else:
      state_dict, _ = _read_edm_pickle(src)
      kw = _read_init_kwargs(init_kwargs)
  elif ext in (".npz", ".safetensors"):
    if init_kwargs is None:
      raise ConversionError(f"{src!r} is a bare state dict: pass the network's init_kwargs (--init_kwargs=JSON)")
    kw = _read_init_kwargs(init_kwargs)
    state_dict = load_state_dict(src)
  else:
    raise ConversionError(f"unknown file type {ext!r} for {src!r}: expected an EDM network pickle (.pkl) or a "
                          "state dict (.npz / .safetensors) with --init_kwargs")
  module, params = convert_state_dict(state_dict, kw)
  save_converted(dst, params, {"network": NETWORK, "init_kwargs": kw, "source": os.path.basename(src)})
  return module, params


def load_converted_edm(src_dir, *, dtype=jnp.float32, remat: bool = False, attention: str = "auto"):
  """Reads a folder written by ``convert_file`` → ``(EDMPrecond, params)``. ``dtype``: the activation dtype,
  ``remat``: per-block rematerialisation, ``attention``: the attention kernel ('auto' | 'xla' | 'cudnn' | 'splash', see
  ``dmd_jax.models.attention``; ``ValueError`` for another)."""
  check_implementation(attention)
  params, config = load_converted(src_dir)
  check_network(config, NETWORK, src_dir)
  module = edm_models.edm_module_from_kwargs(config["init_kwargs"], dtype=dtype, remat=remat, attention=attention)
  return module, params


# ---------------------------------------------------------------------------------------------------------------
# Command line (see dmd_jax/convert/__main__.py).
# ---------------------------------------------------------------------------------------------------------------

HELP = "EDM EDMPrecond networks: an EDM .pkl, or a .npz/.safetensors state dict plus --init_kwargs=JSON"


def add_arguments(parser) -> None:
  parser.add_argument("--src", required=True, help="EDM network pickle (.pkl) or state dict (.npz/.safetensors)")
  parser.add_argument("--dst", required=True, help="output folder (params.npz + config.json)")
  parser.add_argument("--init_kwargs", default=None,
                      help="JSON file with the network's init_kwargs (required for a state dict)")


def run(args) -> None:
  module, params = convert_file(args.src, args.dst, args.init_kwargs)
  print(f"converted EDM {module.model_type} ({count_params(params):,} parameters) from {args.src} -> {args.dst}")


# ---------------------------------------------------------------------------------------------------------------
# Random-weight teachers for the ``:tiny`` configs: a state dict in the real (PyTorch) format, converted by the
# same path as a downloaded checkpoint.
# ---------------------------------------------------------------------------------------------------------------

def random_state_dict(init_kwargs: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
  """An EDMPrecond state dict with He-scaled random weights (PyTorch keys and layouts)."""
  module = edm_models.edm_module_from_kwargs(init_kwargs)
  params_spec, buffer_spec = expected_state_dict(module)
  sd = common.random_state_dict({key: shape for key, shape in params_spec.values()}, seed)
  for names, (key, shape) in params_spec.items():
    if names[-1] == "freqs":
      sd[key] = np.random.default_rng(seed).normal(0.0, 16.0, shape).astype(np.float32)
  f = edm_models.resample_filter_2d(init_kwargs.get("resample_filter", (1, 1))
                                    if module.model_type == "SongUNet" else (1, 1))
  for key, shape in buffer_spec.items():
    sd[key] = f.reshape(shape).astype(np.float32)
  return sd


def write_random_teacher(dst, init_kwargs: Mapping[str, Any], seed: int = 0):
  """Writes a random state dict as ``.npz`` + ``init_kwargs.json`` next to ``dst`` and converts it into ``dst``."""
  dst = os.fspath(dst)
  src_dir = dst + "-source"                    # through dmd_jax.io: a gs:// workdir works too
  dio.write_npz(dio.join(src_dir, "state_dict.npz"), **random_state_dict(init_kwargs, seed))
  dio.write_json(dio.join(src_dir, "init_kwargs.json"), dict(init_kwargs))
  return convert_file(dio.join(src_dir, "state_dict.npz"), dst, dict(init_kwargs))
