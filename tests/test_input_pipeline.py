"""Prepared tfds datasets (tfds.data_source, ArrayRecord): the single pass and tfds reference statistics, offline,
without TF.

Two kinds of data, both without downloads or TensorFlow:
- tiny *real* prepared datasets named ``cifar10``, ``imagenet_resized/64x64`` and ``coco_captions/2014`` with
  the real feature structures (``tests/tfds_testing.py``), so the real ArrayRecord read and decode path of
  ``tfds.data_source`` runs;
- ``tfds.testing.mock_data(policy=USE_FILES)`` on the same metadata: random examples of any count.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dmd_jax.data import input_pipeline as ip
from dmd_jax.evaluation import fid
from dmd_jax.evaluation import reference_stats as rs
from dmd_jax.models.inception import InceptionV3FID
import tfds_testing
from tfds_testing import N_TRAIN


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tfds_testing.prepare(str(tmp_path_factory.mktemp("tfds")))


# ---------------------------------------------------------------------------------------------------------
# Real prepared ArrayRecord datasets
# ---------------------------------------------------------------------------------------------------------

def test_prepared_datasets_are_found(data_dir):
  assert ip.find_prepared("cifar10", data_dir) == ("cifar10", "3.0.2")
  assert ip.find_prepared("imagenet_resized/64x64", data_dir) == ("imagenet_resized/64x64", "0.1.1")
  assert ip.find_prepared("coco_captions", data_dir) == ("coco_captions/2014", "1.1.0")
  assert len(ip.open_source("coco_captions", "train", data_dir)) == N_TRAIN["coco_captions"]


@pytest.mark.parametrize("name,size", [("cifar10", 32), ("imagenet_resized/64x64", 64)])
def test_labelled_shapes_and_dtypes(data_dir, name, size):
  it = ip.make_single_pass_pipeline(name, "train", data_dir=data_dir, global_batch_size=4,
                                    process_index=0, process_count=1)
  b = next(iter(it))
  assert sorted(b) == ["image", "index", "label"]
  assert b["image"].shape == (4, size, size, 3) and b["image"].dtype == np.uint8
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  assert b["index"].dtype == np.int64
  # Rows are the records named by `index`, with the pixels written (PNG: lossless).
  src = ip.open_source(name, "train", data_dir)
  for row, i in enumerate(b["index"].tolist()):
    np.testing.assert_array_equal(b["image"][row], src[i]["image"])
    assert b["label"][row] == src[i]["label"]
  assert {int(src[i]["label"]) for i in range(len(src))} == set(range(10))
  # image_size resizes (centre crop of a square is the identity).
  b = next(iter(ip.make_single_pass_pipeline(name, "train", data_dir=data_dir, global_batch_size=2,
                                             image_size=16, process_index=0, process_count=1)))
  assert b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.uint8


def test_coco_captions(data_dir):
  it = ip.make_single_pass_pipeline("coco_captions", "train", data_dir=data_dir, global_batch_size=3,
                                    image_size=24, process_index=0, process_count=1)
  b = next(iter(it))
  assert sorted(b) == ["caption", "image", "index"]
  assert b["image"].shape == (3, 24, 24, 3) and b["image"].dtype == np.uint8
  assert b["caption"].shape == (3,) and b["caption"].dtype.kind == "U"
  src = ip.open_source("coco_captions", "train", data_dir)
  for cap, idx in zip(b["caption"], b["index"]):
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in src[int(idx)]["captions"]["text"]]
    assert len(texts) == 5 and cap in texts
  # Without image_size: the original varying sizes, as an object array; the caption is caption 0.
  b = next(iter(ip.make_single_pass_pipeline("coco_captions", "val", data_dir=data_dir, global_batch_size=5,
                                             process_index=0, process_count=1)))
  assert b["image"].dtype == object and len(b["image"]) == 5
  assert len({im.shape for im in b["image"]}) > 1 and all(im.dtype == np.uint8 for im in b["image"])
  src = ip.open_source("coco_captions", "val", data_dir)
  assert b["index"].tolist() == list(range(5))
  assert sorted(b["caption"]) == [f"caption 0 of image 5_{i}" for i in range(5)]
  for i in range(5):
    assert src[i]["image"].shape == b["image"][i].shape


@pytest.mark.parametrize("count,batch", [(1, 4), (2, 4), (3, 3)])
def test_single_pass_covers_every_example_once(data_dir, count, batch):
  n = N_TRAIN["cifar10"]
  seen, steps = [], []
  for p in range(count):
    it = ip.make_single_pass_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=batch,
                                      process_index=p, process_count=count)
    bs = list(it)
    steps.append(len(bs))
    assert len(it) == len(bs) == -(-n // batch)  # the same number of batches on every process
    for b in bs:
      assert len(b["image"]) == len(b["label"]) == len(b["index"]) <= batch // count
      seen.extend(b["index"].tolist())
  assert sorted(seen) == list(range(n))
  # Process 0 of 1 reads in record order.
  if count == 1:
    assert seen == list(range(n))


def test_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10.*imagenet_resized/64x64.*coco"):
    ip.make_single_pass_pipeline("mnist", "train", data_dir=data_dir, global_batch_size=4)
  with pytest.raises(FileNotFoundError, match=r"(?s)not prepared.*tfds build cifar10 --data_dir="):
    ip.make_single_pass_pipeline("cifar10", "train", data_dir=str(tmp_path), global_batch_size=4)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.make_single_pass_pipeline("cifar10", "train", data_dir=str(tmp_path / "nope"), global_batch_size=4)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    ip.make_single_pass_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=4, process_index=0,
                                 process_count=3)
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    ip.make_single_pass_pipeline("cifar10", "validation", data_dir=data_dir, global_batch_size=4,
                                 process_index=0, process_count=1)
  tf_dir = tmp_path / "tfrecord" / "cifar10" / "3.0.2"
  tf_dir.mkdir(parents=True)
  with open(os.path.join(data_dir, "cifar10", "3.0.2", "dataset_info.json")) as f:
    info = json.load(f)
  (tf_dir / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  with pytest.raises(ValueError, match="prepared as 'tfrecord'.*--file_format=array_record"):
    ip.make_single_pass_pipeline("cifar10", "train", data_dir=str(tmp_path / "tfrecord"), global_batch_size=4,
                                 process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------------------
# tfds.testing.mock_data
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,image_size,keys", [
    ("cifar10", None, ["image", "index", "label"]),
    ("imagenet_resized/64x64", None, ["image", "index", "label"]),
    ("coco_captions", 32, ["caption", "image", "index"]),
])
def test_mock_data(data_dir, name, image_size, keys):
  split = "val" if name == "coco_captions" else "train"
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    assert len(ip.open_source(name, split, data_dir)) == 40
    bs = list(ip.make_single_pass_pipeline(name, split, data_dir=data_dir, global_batch_size=8,
                                           image_size=image_size, process_index=0, process_count=1))
    single = list(ip.make_single_pass_pipeline(name, split, data_dir=data_dir, global_batch_size=16,
                                               image_size=image_size, process_index=1, process_count=2))
  size = image_size or {"cifar10": 32, "imagenet_resized/64x64": 64}[name]
  for b in bs:
    assert sorted(b) == keys
    assert b["image"].shape == (8, size, size, 3) and b["image"].dtype == np.uint8
    if "label" in b:
      assert b["label"].dtype == np.int32 and b["label"].min() >= 0
    if "caption" in b:
      assert b["caption"].dtype.kind == "U" and all(len(c) > 0 for c in b["caption"])
  assert sorted(np.concatenate([b["index"] for b in bs[:5]]).tolist()) == list(range(40))
  assert [len(b["index"]) for b in single] == [8, 8, 4]
  assert np.concatenate([b["index"] for b in single]).tolist() == list(range(1, 40, 2))


# ---------------------------------------------------------------------------------------------------------
# Reference statistics from a tfds split
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
  """The real FID Inception-v3 with random parameters (shapes from ``jax.eval_shape``: no init compile)."""
  module = InceptionV3FID()
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))))["params"]
  rng = np.random.default_rng(0)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("mean", "bias"):
      return np.zeros(leaf.shape, np.float32)
    if name in ("var", "scale"):
      return np.ones(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return module, jax.tree_util.tree_map_with_path(make, shapes)


def test_reference_stats_cached_and_reloaded(data_dir, tmp_path, inception):
  module, params = inception
  cache = str(tmp_path / "refs" / "cifar10_test.npz")
  mu, sigma = rs.reference_stats_from_tfds("cifar10", "test", data_dir, module, params, batch_size=4,
                                           cache_path=cache)
  assert os.path.exists(cache)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == np.float64
  assert np.abs(mu).max() > 1e-3 and np.trace(sigma) > 1e-3  # not degenerate
  # The same numbers as features of every test image at once.
  src = ip.open_source("cifar10", "test", data_dir)
  images = np.stack([src[i]["image"] for i in range(len(src))])
  mu_ref, sigma_ref = fid.compute_statistics(module, params, images, batch_size=4)
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6)
  # The cache is used: identical numbers, without touching the data (a missing data_dir does not matter).
  t = time.perf_counter()
  mu2, sigma2 = rs.reference_stats_from_tfds("cifar10", "test", str(tmp_path / "gone"), module, params,
                                             batch_size=4, cache_path=cache)
  assert time.perf_counter() - t < 5
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  # max_examples caps the count (and is part of a separate cache).
  mu3, _ = rs.reference_stats_from_tfds("cifar10", "test", data_dir, module, params, batch_size=4,
                                        cache_path=str(tmp_path / "first5.npz"), max_examples=5)
  mu5, _ = fid.compute_statistics(module, params, images[:5], batch_size=4)
  np.testing.assert_allclose(mu3, mu5, rtol=1e-6, atol=1e-6)
