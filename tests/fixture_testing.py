"""Helpers for the parity tests: relative error, reading the ``tests/fixtures`` files, the seeded weights of the
LPIPS and Inception fixtures, and the EDM fixture networks.

Only numpy at import: ``tests/fixtures/make_fixtures.py`` imports the weight recipe from here in the reference
virtualenv, which has no jax (the EDM helpers import jax when called).

The LPIPS-VGG16 trunk and the FID Inception-v3 of the fixtures are random networks that are not committed: each
tensor is rebuilt from ``(seed, name, shape)`` (``seeded_tensor``). Every value is an exact float16 of the form
``center + step * k`` with ``k`` a uniform integer in ``[-k_max, k_max]`` drawn from the raw 64-bit stream of
``np.random.PCG64([seed, crc32(name)])`` (``k = raw % (2 k_max + 1) - k_max``): integer arithmetic and numpy's
stable bit-generator stream, so the same bits on every platform and numpy version.

- ``weight`` with ndim >= 2 (conv, linear): He uniform, ``±sqrt(6 / fan_in)`` with ``fan_in = prod(shape[1:])``:
  writing ``sqrt(6 / fan_in) = m 2^e`` with ``m`` in [0.5, 1) (``math.frexp``): center 0, step ``2^(e - 11)``,
  ``k_max = floor(m 2^11)``;
- ``weight`` with ndim 1 (batch-norm scale): center 1, step 2^-10, k_max 205 ([0.8, 1.2]);
- ``bias`` (conv, batch-norm shift, fc): center 0, step 2^-13, k_max 1024 ([-0.125, 0.125]);
- ``running_mean``: center 0, step 2^-12, k_max 1024 ([-0.25, 0.25]);
- ``running_var``: center 1, step 2^-10, k_max 512 ([0.5, 1.5]).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import pathlib
import zlib

import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
ASSETS = FIXTURES.parent.parent / "dmd_jax" / "assets"
LPIPS_LIN_ASSET = ASSETS / "lpips_v0.1_vgg_lin.npz"


def rel_err(got, want) -> float:
  """``max |got - want| / max |want|`` in float64; the shapes must match (no broadcasting)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def nhwc(a):
  return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
  with np.load(FIXTURES / f"{name}.npz") as f:
    return {k: f[k] for k in f.files}


def load_fixture(name: str) -> dict:
  """All arrays of ``tests/fixtures/<name>.npz`` (a new dict of the cached arrays: do not write into them)."""
  return dict(_load(name))


def load_json(name: str) -> dict:
  return json.loads((FIXTURES / f"{name}.json").read_text())


def params_of(data: dict, dtype=np.float32) -> dict:
  """The ``param/<torch key>`` entries of a fixture as a state dict, cast to ``dtype`` (None: as stored)."""
  return {k[len("param/"):]: (v if dtype is None else v.astype(dtype))
          for k, v in data.items() if k.startswith("param/")}


# ---------------------------------------------------------------------------------------------------------
# Seeded weights (LPIPS trunk, FID Inception)
# ---------------------------------------------------------------------------------------------------------

def _recipe(name: str, shape: tuple[int, ...]) -> tuple[float, float, int]:
  """``(center, step, k_max)`` of a tensor (see the module docstring)."""
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "weight" and len(shape) >= 2:
    m, e = math.frexp(math.sqrt(6.0 / math.prod(shape[1:])))
    return 0.0, math.ldexp(1.0, e - 11), math.floor(m * 2 ** 11)
  if leaf == "weight" and len(shape) == 1:
    return 1.0, 2.0 ** -10, 205
  if leaf == "bias":
    return 0.0, 2.0 ** -13, 1024
  if leaf == "running_mean":
    return 0.0, 2.0 ** -12, 1024
  if leaf == "running_var":
    return 1.0, 2.0 ** -10, 512
  raise ValueError(f"no seeded-weight recipe for {name} {shape}")


def seeded_tensor(seed: int, name: str, shape) -> np.ndarray:
  """The float16 tensor ``name`` of a seeded state dict (exact: see the module docstring)."""
  shape = tuple(int(s) for s in shape)
  center, step, k_max = _recipe(name, shape)
  raw = np.random.PCG64([seed, zlib.crc32(name.encode())]).random_raw(math.prod(shape))
  k = (raw % np.uint64(2 * k_max + 1)).astype(np.int64) - k_max
  values = center + step * k.astype(np.float64)  # exact: |k| < 2^11, step a power of two
  out = values.astype(np.float16)
  assert np.array_equal(out.astype(np.float64), values), name  # every value a float16, no rounding
  return out.reshape(shape)


def seeded_state_dict(spec: dict, dtype=np.float32) -> dict:
  """``{name: tensor}`` for ``spec = {"seed": int, "params": [[name, shape], ...]}`` (a fixture's json), in the
  order of ``spec["params"]``, cast to ``dtype`` (None: float16)."""
  out = {}
  for name, shape in spec["params"]:
    t = seeded_tensor(spec["seed"], name, shape)
    out[name] = t if dtype is None else t.astype(dtype)
  return out


def weights_sha256(state_dict: dict) -> str:
  """A digest of a float16 state dict (names, shapes and little-endian bytes, in order)."""
  h = hashlib.sha256()
  for k, v in state_dict.items():
    h.update(f"{k}{tuple(v.shape)}".encode())
    h.update(np.ascontiguousarray(v, "<f2").tobytes())
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _seeded(name: str) -> dict:
  spec = load_json(name)
  sd = seeded_state_dict(spec, dtype=None)
  got = weights_sha256(sd)
  assert got == spec["weights_sha256"], (
      f"the seeded weights of {name} are not the ones of the reference run (sha256 {got}, recorded "
      f"{spec['weights_sha256']}): the recipe in tests/fixture_testing.py or numpy's PCG64 stream changed")
  return sd


def fixture_state_dict(name: str, dtype=np.float32) -> dict:
  """The seeded state dict of fixture ``name`` (``inception_fid``, ``lpips_vgg``: the trunk only)."""
  return {k: (v if dtype is None else v.astype(dtype)) for k, v in _seeded(name).items()}


def lpips_lin_weights() -> dict:
  """``{'lin0': [64], ..., 'lin4': [512]}`` float32: the v0.1 VGG linear weights shipped with dmd_jax (read
  here as a file, independently of ``dmd_jax.convert.lpips``)."""
  with np.load(LPIPS_LIN_ASSET) as f:
    return {f"lin{k}": f[f"lin{k}"] for k in range(5)}


def lin_weights_sha256(lins: dict) -> str:
  """A digest of the five linear weights (float32, lin0..lin4 concatenated): the fixture records the one of the
  ``lpips`` package's weights, so a changed asset is caught by name."""
  flat = np.concatenate([np.asarray(lins[f"lin{k}"], np.float32).reshape(-1) for k in range(5)])
  return hashlib.sha256(flat.astype("<f4").tobytes()).hexdigest()


def lpips_state_dict(lins: dict | None = None, spec: dict | None = None, dtype=np.float32) -> dict:
  """The state dict of the LPIPS fixture as ``lpips.LPIPS(net='vgg', version='0.1').state_dict()`` names it: the
  seeded VGG16 trunk (``net.sliceN.I.weight/bias``) and the linear weights (``lins`` or the shipped ones) under
  both names the package registers them (``linK.model.1.weight`` and ``lins.K.model.1.weight``, [1, C, 1, 1]).
  ``spec``: the trunk's seed, names and shapes (default: ``lpips_vgg.json``)."""
  lins = lpips_lin_weights() if lins is None else lins
  out = fixture_state_dict("lpips_vgg", dtype) if spec is None else seeded_state_dict(spec, dtype)
  for prefix in ("lin{}", "lins.{}"):
    for k in range(5):
      w = np.asarray(lins[f"lin{k}"], np.float32).reshape(1, -1, 1, 1)
      out[f"{prefix.format(k)}.model.1.weight"] = w
  return out


# ---------------------------------------------------------------------------------------------------------
# EDM fixtures: networks converted from NVlabs/edm state dicts with their reference outputs
# ---------------------------------------------------------------------------------------------------------

EDM_NAMES = ["edm_ddpmpp_cond", "edm_ncsnpp_uncond", "edm_adm_cond"]


def edm_state_dict(name: str) -> dict:
  """The fixture network's state dict as stored (float16)."""
  return params_of(_load(name), dtype=None)


def edm_init_kwargs(name: str) -> dict:
  return load_json(name)


@functools.lru_cache(maxsize=None)
def edm_fixture(name: str):
  """``(module, params, inputs, outputs)``: the converted fixture network (float32), its inputs (NHWC) and the
  reference ``out/`` and ``act/`` arrays (NHWC)."""
  import jax.numpy as jnp
  from dmd_jax.families.edm.convert import convert_state_dict
  data = _load(name)
  module, params = convert_state_dict(params_of(data), edm_init_kwargs(name))
  inputs = (jnp.asarray(nhwc(data["in/x_nchw"])), jnp.asarray(data["in/sigma"]),
            jnp.asarray(data["in/class_labels"]) if "in/class_labels" in data else None)
  outputs = {"D": nhwc(data["out/D_nchw"])}
  outputs.update({k[len("act/"):]: nhwc(v) for k, v in data.items() if k.startswith("act/")})
  return module, params, inputs, outputs


def compile_fast(f, *args):
  """``jax.jit(f)`` compiled for ``args`` with LLVM optimisation off: half the CPU compile time, same numbers
  to float tolerance."""
  import jax
  return jax.jit(f).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def edm_forward(name: str, dtype=None):
  """A compiled ``params -> (D, features, intermediates)`` for an EDM fixture network in ``dtype`` (default
  float32; compiled once per dtype, any parameters of the same shapes reuse it)."""
  import jax.numpy as jnp
  module, params, (x, sigma, labels), _ = edm_fixture(name)
  module = module.clone(dtype=jnp.float32 if dtype is None else dtype)

  def f(params):
    (d, feats), state = module.apply({"params": params}, x, sigma, labels, return_features=True,
                                     mutable=["intermediates"])
    return d, feats, {k: v[0] for k, v in state["intermediates"]["model"].items()}

  return compile_fast(f, params)
