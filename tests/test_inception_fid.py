"""FID Inception-v3 port and converter vs pytorch-fid / torch-fidelity golden vectors (``tests/fixtures/
inception_fid``: a seeded random network; see tests/fixtures/README.md), the Fréchet distance vs scipy, and feature
extraction on 8 emulated devices vs 1."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import scipy.linalg

from dmd_jax.convert.common import ConversionError
from dmd_jax.convert.inception import (convert_file, convert_state_dict, expected_shapes,
                                       load_converted_inception)
from dmd_jax.evaluation import fid
from fixture_testing import fixture_state_dict, load_fixture, nhwc, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def fixture():
  return load_fixture("inception_fid")


@pytest.fixture(scope="module")
def state_dict():
  """pytorch-fid's FID Inception state dict of the reference run (seeded weights, float32; with ``fc``)."""
  return fixture_state_dict("inception_fid")


@pytest.fixture(scope="module")
def converted(state_dict):
  return convert_state_dict(state_dict)


def images_nhwc(fixture):
  return nhwc(fixture["in/img_uint8_nchw"])


# ---------------------------------------------------------------------------------------------------------
# Network and protocols vs the golden vectors
# ---------------------------------------------------------------------------------------------------------

def test_tf1_resize_matches_torch_fidelity(fixture):
  ref = nhwc(fixture["out/tf1_resized_299_nchw_0"])
  got = np.asarray(fid.tf1_resize(images_nhwc(fixture)[:1]))
  assert got.shape == (1, 299, 299, 3)
  assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("protocol,key", [("tf1", "out/pool3_tf1"), ("pytorch_fid", "out/pool3_pytorch_fid")])
def test_pool_features_match_reference(fixture, converted, protocol, key):
  module, params = converted
  # batch_size 2 with 3 images: the last batch is padded and its extra row dropped.
  got = fid.inception_features(module, params, images_nhwc(fixture), protocol=protocol, batch_size=2)
  assert got.shape == (3, 2048) and got.dtype == np.float32
  assert rel_err(got, fixture[key]) <= 1e-5


def test_protocols_differ(fixture):
  # The two resizes differ by about half a source pixel at 32 px: not interchangeable.
  x = images_nhwc(fixture)
  a = np.asarray(fid.preprocess(x, "tf1"))
  b = np.asarray(fid.preprocess(x, "pytorch_fid"))
  assert np.abs(a - b).max() > 0.05
  with pytest.raises(ValueError, match="clean"):
    fid.preprocess(x, "clean")


def test_rejects_non_uint8(converted):
  module, params = converted
  with pytest.raises(ValueError, match="uint8"):
    fid.inception_features(module, params, np.zeros((1, 8, 8, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------------------

def test_converter_drops_fc_and_num_batches_tracked(state_dict, converted):
  assert "fc.weight" in state_dict
  sd = dict(state_dict)
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(7)
  _, params = convert_state_dict(sd)
  assert "fc" not in params
  _, ref = converted
  assert jax.tree.all(jax.tree.map(np.array_equal, params, ref))
  np.testing.assert_array_equal(params["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"],
                                state_dict["Mixed_5b.branch5x5_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])


def test_converter_errors_name_the_problem(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6b.branch7x7_2.bn.running_var"]
  with pytest.raises(ConversionError, match=r"missing keys.*Mixed_6b\.branch7x7_2\.bn\.running_var"):
    convert_state_dict(sd)
  sd = dict(state_dict)
  sd["Mixed_7c.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)
  with pytest.raises(ConversionError, match=r"wrong shapes.*Mixed_7c\.branch3x3_2a\.conv\.weight: "
                                            r"expected \(384, 384, 1, 3\), got \(384, 384, 3, 1\)"):
    convert_state_dict(sd)
  sd = dict(state_dict)
  sd["Mixed_8a.conv.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(ConversionError, match=r"unexpected keys.*Mixed_8a\.conv\.weight"):
    convert_state_dict(sd)


def test_convert_file_roundtrip_and_errors(tmp_path, state_dict, converted):
  torch = pytest.importorskip("torch")
  _, ref = converted
  src = tmp_path / "pt_inception.pth"  # pytorch-fid's file format: a torch-saved state dict
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, src)
  convert_file(src, tmp_path / "out")
  module, params = load_converted_inception(tmp_path / "out")
  assert module.precision == jax.lax.Precision.HIGHEST
  assert jax.tree.all(jax.tree.map(np.array_equal, params, ref))
  assert len(expected_shapes()) == 94 * 5  # 94 BasicConvs: conv + 4 BN tensors each

  (tmp_path / "weights.txt").write_text("not weights")
  with pytest.raises(ConversionError, match=r"unknown file type '\.txt'.*weights\.txt"):
    convert_file(tmp_path / "weights.txt", tmp_path / "bad")
  with pytest.raises(ConversionError, match="not a converted network folder"):
    load_converted_inception(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# ---------------------------------------------------------------------------------------------------------

def _scipy_fid(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def _random_stats(rng, n, d, rank=None, shift=0.0):
  """Mean and covariance of n samples of a d-dim Gaussian of rank ``rank`` (covariance rank <= n - 1)."""
  a = rng.standard_normal((rank or d, d)) * (0.5 / np.sqrt(rank or d))
  x = rng.standard_normal((n, rank or d)) @ a + shift + 0.1 * rng.standard_normal(d)
  return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy_2048d():
  rng = np.random.default_rng(0)
  mu1, s1 = _random_stats(rng, 2500, 2048)
  mu2, s2 = _random_stats(rng, 1000, 2048, shift=0.05)  # 1000 samples < 2048: rank <= 999
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert abs(got - _scipy_fid(mu1, s1, mu2, s2)) <= 1e-6 * abs(got)


@pytest.mark.parametrize("rank1,rank2", [(None, None), (20, None), (10, 30)])
def test_frechet_distance_matches_scipy_small(rank1, rank2):
  rng = np.random.default_rng(1)
  mu1, s1 = _random_stats(rng, 500, 64, rank=rank1)
  mu2, s2 = _random_stats(rng, 300, 64, rank=rank2, shift=0.2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert abs(got - _scipy_fid(mu1, s1, mu2, s2)) <= 1e-6 * abs(got)


def test_frechet_distance_identical_is_zero():
  rng = np.random.default_rng(2)
  mu, s = _random_stats(rng, 300, 256)  # rank-deficient as well
  scale = np.trace(s)
  assert abs(fid.frechet_distance(mu, s, mu, s)) <= 1e-9 * scale
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(mu, s, mu[:10], s[:10, :10])


def test_feature_stats_streaming_float64():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((1001, 2048)) * 3 + 1).astype(np.float32)
  stats, other = fid.FeatureStats(), fid.FeatureStats()
  for chunk in np.array_split(x[:700], 7):
    stats.update(chunk)
  other.update(x[700:])
  stats.merge(other)
  mu, sigma = stats.mu_sigma()
  assert stats.count == 1001 and mu.dtype == sigma.dtype == np.float64
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(mu, x64.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False, ddof=1), rtol=0, atol=1e-10)


def test_reference_stats_roundtrip_and_errors(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  fid.save_reference_stats(tmp_path / "ref.npz", mu, sigma)
  ref = fid.load_reference_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(ref["mu"], mu)
  np.testing.assert_array_equal(ref["sigma"], sigma)
  np.savez(tmp_path / "bad.npz", mu=mu, cov=sigma)
  with pytest.raises(ValueError, match=r"bad\.npz.*lack 'sigma'"):
    fid.load_reference_stats(tmp_path / "bad.npz")
  with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
    fid.load_reference_stats(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------------------
# Data parallel: 8 emulated CPU devices vs 1
# ---------------------------------------------------------------------------------------------------------

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys
    import numpy as np
    import jax
    from jax.sharding import Mesh
    from dmd_jax.convert.inception import convert_state_dict
    from dmd_jax.evaluation.fid import inception_features

    assert jax.device_count() == 8, jax.devices()
    tests, out = sys.argv[1:]
    sys.path.insert(0, tests)
    from fixture_testing import fixture_state_dict, load_fixture, nhwc
    module, params = convert_state_dict(fixture_state_dict("inception_fid"))
    images = nhwc(load_fixture("inception_fid")["in/img_uint8_nchw"])
    images = np.concatenate([images, images[::-1, ::-1]])  # 6 images, 32x32
    f8 = inception_features(module, params, images, batch_size=7)                  # 8x1 mesh: 1 step of 8
    mesh42 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    f42 = inception_features(module, params, images, batch_size=8, mesh=mesh42)    # batch over data x fsdp
    np.savez(out, f8=f8, f42=f42)
""")


def test_features_8_devices_equal_1_device(tmp_path, fixture, converted):
  module, params = converted
  images = images_nhwc(fixture)
  images = np.concatenate([images, images[::-1, ::-1]])
  f1 = fid.inception_features(module, params, images, batch_size=4)  # 1 device: 2 steps, last one padded
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp_path / "features.npz"
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, HERE, str(out)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as f:
    for name in ("f8", "f42"):
      assert f[name].shape == (6, 2048), name
      assert rel_err(f[name], f1) <= 1e-6, name
