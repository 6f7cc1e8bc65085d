"""EDM teacher networks: parity with the PyTorch reference (fixtures from NVlabs/edm on random weights),
published parameter counts, bf16, remat, features. Run with ``-s`` to see the measured errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs
from fixture_testing import EDM_NAMES as NAMES
from fixture_testing import compile_fast, edm_fixture, edm_forward, rel_err


def all_errors(name, params, dtype=None):
  d, feats, acts = edm_forward(name, dtype)(params)
  outputs = edm_fixture(name)[3]
  errs = {"D": rel_err(d, outputs["D"])}
  missing = sorted(set(outputs) - {"D"} - set(acts))
  assert not missing, f"activations not produced: {missing}"
  errs.update({k: rel_err(acts[k], v) for k, v in outputs.items() if k != "D"})
  return errs, d, feats, acts


@pytest.mark.parametrize("name", NAMES)
def test_parity_float32(name):
  module, params, _, outputs = edm_fixture(name)
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
  params = edm_fixture(name)[1]
  errs, *_ = all_errors(name, _contiguous_thirds_qkv(params))
  print(f"\n{name} with a contiguous-thirds qkv split: D rel err {errs['D']:.2e}")
  assert errs["D"] > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_activations(name):
  params = edm_fixture(name)[1]
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
