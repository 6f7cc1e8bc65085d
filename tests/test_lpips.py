"""LPIPS v0.1 VGG port and converter vs the ``lpips`` 0.1.4 golden vectors (``tests/fixtures/lpips_vgg``: a
seeded random VGG16 trunk with the real v0.1 linear weights; see tests/fixtures/README.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.convert.common import ConversionError
from dmd_jax.convert.lpips import (convert_file, convert_state_dict, default_lin_weights,
                                   load_converted_lpips)
from dmd_jax.models.lpips import lpips_distance, normalize_channels
from fixture_testing import lin_weights_sha256, load_fixture, load_json, lpips_state_dict, nhwc, rel_err


@pytest.fixture(scope="module")
def fixture():
  return load_fixture("lpips_vgg")


@pytest.fixture(scope="module")
def state_dict():
  """``lpips.LPIPS(net='vgg').state_dict()`` of the reference run (float32): the seeded trunk and the shipped
  linear weights under both of the package's names."""
  return lpips_state_dict()


@pytest.fixture(scope="module")
def converted(state_dict):
  return convert_state_dict(state_dict)


@pytest.fixture(scope="module")
def inputs(fixture):
  return tuple(nhwc(fixture[k]) for k in ("in/x0_nchw", "in/x1_nchw"))


def test_lpips_native_matches_reference(fixture, converted, inputs):
  module, params = converted
  got = jax.jit(module.apply)({"params": params}, *inputs)
  assert got.shape == (2,)
  assert rel_err(got, fixture["out/lpips_native"]) <= 1e-5


def test_upsample_matches_torch_interpolate(fixture, inputs):
  up = jax.image.resize(inputs[0], (2, 224, 224, 3), method="bilinear", antialias=False)
  assert rel_err(up, nhwc(fixture["out/x0_up224_nchw"])) <= 1e-5


def test_lpips_distance_224_matches_reference_and_is_differentiable(fixture, converted, inputs):
  module, params = converted
  dist = jax.jit(lambda p, a, b: lpips_distance(module, p, a, b, resize_to=224))
  assert rel_err(dist(params, *inputs), fixture["out/lpips_up224"]) <= 1e-5
  # Gradient through the upsampling and the network (a smaller target keeps the test fast).
  x0, x1 = inputs[0][:1], inputs[1][:1]
  loss = lambda a, b, p: lpips_distance(module, p, a, b, resize_to=96).sum()
  grad = jax.jit(jax.grad(loss))(x0, x1, params)
  assert grad.shape == x0.shape
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_normalize_channels_gradient_finite_at_zero():
  g = jax.grad(lambda x: normalize_channels(x).sum())(jnp.zeros((1, 2, 2, 8)))
  assert np.all(np.isfinite(g))


def test_bf16_activations_close(converted, inputs):
  module, params = converted
  ref = jax.jit(module.apply)({"params": params}, *inputs)
  got = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  assert got.dtype == jnp.float32
  assert rel_err(got, ref) <= 5e-2


def test_torchvision_naming_and_default_lin(state_dict, converted):
  _, ref = converted
  tv = {}
  for k, v in state_dict.items():
    if k.startswith("net.slice"):
      _, _, idx, leaf = k.split(".")
      tv[f"features.{idx}.{leaf}"] = v
  tv["classifier.0.weight"] = np.zeros((4096, 25088), np.float16)  # dropped
  _, params = convert_state_dict(tv)  # no lin weights: the shipped v0.1 ones
  assert jax.tree.all(jax.tree.map(np.array_equal, params, ref))
  # The shipped weights are the lpips package's (the reference run recorded their digest).
  assert lin_weights_sha256(default_lin_weights()) == load_json("lpips_vgg")["lin_sha256"]
  for k in range(5):
    np.testing.assert_array_equal(params[f"lin{k}"]["kernel"].reshape(-1),
                                  state_dict[f"lin{k}.model.1.weight"].reshape(-1))


def test_converter_errors_name_the_problem(state_dict):
  sd = dict(state_dict)
  del sd["net.slice3.12.bias"]
  with pytest.raises(ConversionError, match=r"missing keys.*net\.slice3\.12\.bias"):
    convert_state_dict(sd)
  sd = dict(state_dict)
  sd["net.slice5.28.weight"] = np.zeros((512, 512, 1, 1), np.float32)
  with pytest.raises(ConversionError, match=r"net\.slice5\.28\.weight: expected \(512, 512, 3, 3\), "
                                            r"got \(512, 512, 1, 1\)"):
    convert_state_dict(sd)
  sd = {k: v for k, v in state_dict.items() if k != "lin2.model.1.weight"}
  with pytest.raises(ConversionError, match=r"missing keys.*lin2\.model\.1\.weight"):
    convert_state_dict(sd)
  sd = dict(state_dict)
  sd["lin0.model.1.weight"] = -sd["lin0.model.1.weight"]
  with pytest.raises(ConversionError, match="lin0 has negative weights"):
    convert_state_dict(sd)
  with pytest.raises(ConversionError, match="no VGG16 trunk found"):
    convert_state_dict({"conv.weight": np.zeros((1,))})


def test_convert_file_roundtrip(tmp_path, state_dict, converted):
  _, ref = converted
  np.savez(tmp_path / "vgg.npz", **state_dict)
  convert_file(tmp_path / "vgg.npz", tmp_path / "out")
  _, params = load_converted_lpips(tmp_path / "out")
  assert jax.tree.all(jax.tree.map(np.array_equal, params, ref))
  (tmp_path / "vgg.h5").write_text("")
  with pytest.raises(ConversionError, match=r"unknown file type '\.h5'"):
    convert_file(tmp_path / "vgg.h5", tmp_path / "bad")
