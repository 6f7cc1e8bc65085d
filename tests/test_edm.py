"""EDM teacher networks: parity with the PyTorch reference (fixtures from NVlabs/edm on random weights),
published parameter counts, bf16, remat, features. Run with ``-s`` to see the measured errors."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.convert.edm import convert_state_dict
from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NAMES = ["edm_ddpmpp_cond", "edm_ncsnpp_uncond", "edm_adm_cond"]


def rel_err(got, want):
  """max |got - want| / max |want|."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def fixture(name):
  """``(module, params, inputs, outputs)``: the converted fixture network, its inputs (NHWC) and the reference
  ``out/`` and ``act/`` arrays (NHWC)."""
  data = np.load(FIXTURES / f"{name}.npz")
  init_kwargs = json.loads((FIXTURES / f"{name}.json").read_text())
  state_dict = {k[len("param/"):]: data[k].astype(np.float32) for k in data.files if k.startswith("param/")}
  module, params = convert_state_dict(state_dict, init_kwargs)
  inputs = (jnp.asarray(nhwc(data["in/x_nchw"])), jnp.asarray(data["in/sigma"]),
            jnp.asarray(data["in/class_labels"]) if "in/class_labels" in data.files else None)
  outputs = {"D": nhwc(data["out/D_nchw"])}
  outputs.update({k[len("act/"):]: nhwc(data[k]) for k in data.files if k.startswith("act/")})
  return module, params, inputs, outputs


def compile_fast(f, *args):
  """``jax.jit(f)`` compiled for ``args`` with LLVM optimisation off: half the CPU compile time, same numbers
  to float tolerance."""
  return jax.jit(f).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def forward(name, dtype=jnp.float32):
  """A compiled ``params -> (D, features, intermediates)`` for a fixture network (once per dtype; any
  parameter values of the same shapes reuse it)."""
  module, params, (x, sigma, labels), _ = fixture(name)
  module = module.clone(dtype=dtype)

  def f(params):
    (d, feats), state = module.apply({"params": params}, x, sigma, labels, return_features=True,
                                     mutable=["intermediates"])
    return d, feats, {k: v[0] for k, v in state["intermediates"]["model"].items()}

  return compile_fast(f, params)


def all_errors(name, params, dtype=jnp.float32):
  d, feats, acts = forward(name, dtype)(params)
  outputs = fixture(name)[3]
  errs = {"D": rel_err(d, outputs["D"])}
  missing = sorted(set(outputs) - {"D"} - set(acts))
  assert not missing, f"activations not produced: {missing}"
  errs.update({k: rel_err(acts[k], v) for k, v in outputs.items() if k != "D"})
  return errs, d, feats, acts


@pytest.mark.parametrize("name", NAMES)
def test_parity_float32(name):
  module, params, _, outputs = fixture(name)
  errs, d, feats, acts = all_errors(name, params)
  worst = max(errs, key=errs.get)
  print(f"\n{name} float32: D rel err {errs['D']:.2e}; worst block {worst} {errs[worst]:.2e}")
  assert d.dtype == jnp.float32
  assert errs["D"] <= 1e-5
  for k, e in errs.items():
    assert e <= 1e-5, (k, e)
  # The features are the encoder output: the last encoder block's activation.
  last_enc = [k for k in outputs if k.startswith("enc.") and "_aux_" not in k][-1]
  assert feats.shape == outputs[last_enc].shape
  assert rel_err(feats, outputs[last_enc]) <= 1e-5


def _contiguous_thirds_qkv(params):
  """Permutes every qkv projection so that the (correct, interleaved) model reads q, k, v from contiguous
  thirds of the PyTorch channels: what a port with the naive split computes."""
  def fix(tree):
    out = {}
    for k, v in tree.items():
      if k == "qkv":
        c3 = v["kernel"].shape[-1]
        c = c3 // 3
        perm = np.array([j * c + i for i in range(c) for j in range(3)])  # new[3i + j] = old[j c + i]
        out[k] = {"kernel": v["kernel"][..., perm], "bias": v["bias"][perm]}
      elif isinstance(v, dict):
        out[k] = fix(v)
      else:
        out[k] = v
    return out
  return fix(params)


@pytest.mark.parametrize("name", NAMES)
def test_qkv_split_mutation_breaks_parity(name):
  params = fixture(name)[1]
  errs, *_ = all_errors(name, _contiguous_thirds_qkv(params))
  print(f"\n{name} with a contiguous-thirds qkv split: D rel err {errs['D']:.2e}")
  assert errs["D"] > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_activations(name):
  params = fixture(name)[1]
  errs, d, _, acts = all_errors(name, params, jnp.bfloat16)
  worst = max(errs, key=errs.get)
  print(f"\n{name} bfloat16: D rel err {errs['D']:.2e}; worst block {worst} {errs[worst]:.2e}")
  assert d.dtype == jnp.float32  # the preconditioning stays float32
  assert acts["enc.16x16_block0"].dtype == jnp.bfloat16
  assert errs["D"] < 3e-2
  for k, e in errs.items():
    assert e < 3e-2, (k, e)


_CIFAR = dict(img_resolution=32, img_channels=3, model_type="SongUNet", augment_dim=9, model_channels=128,
              channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13, use_fp16=False,
              embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
PUBLISHED = {
    "edm-cifar10-32x32-cond-vp": (dict(_CIFAR, label_dim=10), 55_735_299),
    "edm-cifar10-32x32-uncond-vp": (dict(_CIFAR, label_dim=0), 55_733_891),
    "edm-cifar10-32x32-cond-ve": (dict(_CIFAR, label_dim=10, embedding_type="fourier", encoder_type="residual",
                                       resample_filter=[1, 3, 3, 1], channel_mult_noise=2), 56_400_643),
    "edm-imagenet-64x64-cond-adm": (dict(img_resolution=64, img_channels=3, label_dim=1000,
                                         model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4],
                                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1,
                                         use_fp16=True), 295_899_267),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts(name):
  init_kwargs, want = PUBLISHED[name]
  module = edm_module_from_kwargs(init_kwargs)
  (d, feats), variables = jax.eval_shape(
      lambda: module.init_with_output(jax.random.PRNGKey(0), *init_inputs(module, 2), return_features=True))
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  # PyTorch counts parameters only; the NCSN++ Fourier frequencies are a buffer there.
  count = sum(int(np.prod(v.shape)) for p, v in leaves if "freqs" not in jax.tree_util.keystr(p))
  assert count == want
  assert all(v.dtype == jnp.float32 for _, v in leaves)
  res = init_kwargs["img_resolution"]
  assert d.shape == (2, res, res, 3) and d.dtype == jnp.float32
  if init_kwargs["model_type"] == "DhariwalUNet":
    assert feats.shape == (2, 8, 8, 768)  # what DMD2's GAN head reads at ImageNet-64
  else:
    assert feats.shape == (2, 8, 8, 256)


_TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=8,
             channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], augment_dim=2, dropout=0.5,
             embedding_type="fourier", encoder_type="skip", decoder_type="skip", channel_mult_noise=1,
             resample_filter=[1, 3, 3, 1])


def random_params(module, seed=0):
  """Random parameters of the right shapes without ``module.init`` (whose RNG code is slow to compile on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_inputs(module)))["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)


def test_remat_dropout_sigma_broadcast_on_a_tiny_net():
  """Skip encoder and decoder (no fixture covers them), remat, dropout, scalar sigma, zero Fourier gradient."""
  module = edm_module_from_kwargs(_TINY)
  remat = edm_module_from_kwargs(_TINY, remat=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([1, 3]), 4)
  sigma = jnp.array([0.7, 0.7])
  params = random_params(module)

  def loss(p, m):
    return jnp.mean(m.apply({"params": p}, x, sigma, labels) ** 2)

  l0, g0 = compile_fast(jax.value_and_grad(lambda p: loss(p, module)), params)(params)
  l1, g1 = compile_fast(jax.value_and_grad(lambda p: loss(p, remat)), params)(params)

  def forwards(params):
    d_scalar = module.apply({"params": params}, x, 0.7, labels)
    d_eval = module.apply({"params": params}, x, sigma, labels)
    d_train = module.apply({"params": params}, x, sigma, labels, train=True,
                           rngs={"dropout": jax.random.PRNGKey(2)})
    return d_scalar, d_eval, d_train

  d_scalar, d_eval, d_train = compile_fast(forwards, params)(params)
  assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1))) <= 1e-5
  assert float(jnp.abs(g0["model"]["map_noise"]["freqs"]).max()) == 0.0  # a buffer in PyTorch: no gradient
  assert float(jnp.abs(g0["model"]["enc_4x4_aux_skip"]["kernel"]).max()) > 0.0
  assert float(jnp.abs(d_scalar - d_eval).max()) == 0.0  # a scalar sigma broadcasts over the batch
  assert float(jnp.abs(d_train - d_eval).max()) > 1e-4  # dropout only with train=True


def test_unknown_init_kwargs_are_named():
  with pytest.raises(ValueError, match="bogus_key"):
    edm_module_from_kwargs(dict(_TINY, bogus_key=1))
  with pytest.raises(ValueError, match="embedding_type"):  # a SongUNet key on an ADM net
    edm_module_from_kwargs(dict(img_resolution=8, img_channels=3, model_type="DhariwalUNet",
                                embedding_type="fourier"))
