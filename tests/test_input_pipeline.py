"""Input pipelines (grain + tfds.data_source, ArrayRecord) and tfds reference statistics, offline, without TF.

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


def take(it, k):
  return [next(it) for _ in range(k)]


def batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      if x[k].dtype == object:
        assert all(np.array_equal(u, v) for u, v in zip(x[k], y[k]))
      else:
        np.testing.assert_array_equal(x[k], y[k])


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
  it = ip.make_image_pipeline(name, "train", data_dir=data_dir, global_batch_size=4, seed=0,
                              process_index=0, process_count=1)
  b = next(it)
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
  b = next(ip.make_image_pipeline(name, "train", data_dir=data_dir, global_batch_size=2, seed=0,
                                  image_size=16, process_index=0, process_count=1))
  assert b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.uint8


def test_coco_captions(data_dir):
  it = ip.make_image_pipeline("coco_captions", "train", data_dir=data_dir, global_batch_size=3, seed=1,
                              image_size=24, process_index=0, process_count=1)
  b = next(it)
  assert sorted(b) == ["caption", "image", "index"]
  assert b["image"].shape == (3, 24, 24, 3) and b["image"].dtype == np.uint8
  assert b["caption"].shape == (3,) and b["caption"].dtype.kind == "U"
  src = ip.open_source("coco_captions", "train", data_dir)
  for cap, idx in zip(b["caption"], b["index"]):
    texts = [t.decode() if isinstance(t, bytes) else str(t) for t in src[int(idx)]["captions"]["text"]]
    assert len(texts) == 5 and cap in texts
  # Over several epochs an image gets several different captions, deterministically for the seed.
  def caps(seed):
    it = ip.make_image_pipeline("coco_captions", "train", data_dir=data_dir, global_batch_size=7, seed=seed,
                                image_size=8, process_index=0, process_count=1)
    return [dict(zip(b["index"].tolist(), b["caption"].tolist())) for b in take(it, 6)]
  c = caps(1)
  assert c == caps(1)
  assert len({e[0] for e in c}) > 1
  # Without image_size: the original varying sizes, as an object array; 'first' takes caption 0.
  b = next(ip.make_image_pipeline("coco_captions", "val", data_dir=data_dir, global_batch_size=5,
                                  shuffle=False, num_epochs=1, caption="first",
                                  process_index=0, process_count=1))
  assert b["image"].dtype == object and len(b["image"]) == 5
  assert len({im.shape for im in b["image"]}) > 1 and all(im.dtype == np.uint8 for im in b["image"])
  src = ip.open_source("coco_captions", "val", data_dir)
  assert b["index"].tolist() == list(range(5))
  assert sorted(b["caption"]) == [f"caption 0 of image 5_{i}" for i in range(5)]
  for i in range(5):
    assert src[i]["image"].shape == b["image"][i].shape


def test_determinism_and_epochs(data_dir):
  def run(seed):
    it = ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=5, seed=seed,
                                process_index=0, process_count=1)
    return take(it, 9)  # 45 examples: nearly two epochs of 23
  a, b, c = run(3), run(3), run(4)
  batches_equal(a, b)
  idx_a = np.concatenate([x["index"] for x in a])
  idx_c = np.concatenate([x["index"] for x in c])
  assert not np.array_equal(idx_a, idx_c)
  assert sorted(idx_a[:23].tolist()) == list(range(23))       # first epoch: a permutation
  assert len(set(idx_a[23:45].tolist())) == 22                 # second epoch: distinct examples again
  assert not np.array_equal(idx_a[:22], idx_a[23:45])           # reshuffled for epoch 2
  # Two finite epochs: 46 examples → 9 whole batches of 5, then the end; the same order as forever.
  it = ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=5, seed=3, num_epochs=2,
                              process_index=0, process_count=1)
  finite = list(it)
  assert len(it) == len(finite) == 9
  batches_equal(finite, a)


def test_two_processes_split_the_global_batch(data_dir):
  def run(p, n):
    return take(ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=6, seed=7,
                                       process_index=p, process_count=n), 5)
  whole = run(0, 1)
  p0, p1 = run(0, 2), run(1, 2)
  for w, a, b in zip(whole, p0, p1):
    assert a["image"].shape == (3, 32, 32, 3) and b["image"].shape == (3, 32, 32, 3)
    assert not set(a["index"].tolist()) & set(b["index"].tolist())
    assert sorted(a["index"].tolist() + b["index"].tolist()) == sorted(w["index"].tolist())
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]),
                                  np.concatenate([w["label"][0::2], w["label"][1::2]]))
  # The state is the same on every process and does not depend on the process count: a 2-process run
  # resumes on 1 process at the same global batch.
  its = [ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=6, seed=7,
                                process_index=p, process_count=2) for p in range(2)]
  for it in its:
    take(it, 3)
  assert its[0].get_state() == its[1].get_state()
  one = ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=6, seed=7,
                               process_index=0, process_count=1)
  one.set_state(its[1].get_state())
  batches_equal(take(one, 2), whole[3:5])


def test_resume_is_exact(data_dir):
  kw = dict(data_dir=data_dir, global_batch_size=4, seed=11, image_size=16, process_index=1, process_count=2)
  it = ip.make_image_pipeline("coco_captions", "train", **kw)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # through the checkpoint's JSON metadata
  after = take(it, 4)
  it2 = ip.make_image_pipeline("coco_captions", "train", **kw)
  it2.set_state(state)
  assert it2.get_state()["batches"] == 3
  batches_equal(take(it2, 4), after)
  # A state from another pipeline is refused with the setting named.
  other = ip.make_image_pipeline("coco_captions", "train", **{**kw, "seed": 12})
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_resume_with_worker_processes(data_dir):
  kw = dict(data_dir=data_dir, global_batch_size=4, seed=5, process_index=0, process_count=1)
  with ip.make_image_pipeline("cifar10", "train", **kw) as ref:
    expected = take(ref, 5)
  with ip.make_image_pipeline("cifar10", "train", worker_count=1, **kw) as it:
    got = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    got += take(it, 3)
  batches_equal(got, expected)  # one worker: the same batches as in-process reading
  with ip.make_image_pipeline("cifar10", "train", worker_count=1, **kw) as it2:
    it2.set_state(state)
    batches_equal(take(it2, 3), expected[2:])


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
    ip.make_image_pipeline("mnist", "train", data_dir=data_dir, global_batch_size=4)
  with pytest.raises(FileNotFoundError, match=r"(?s)not prepared.*tfds build cifar10 --data_dir="):
    ip.make_image_pipeline("cifar10", "train", data_dir=str(tmp_path), global_batch_size=4)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ip.make_image_pipeline("cifar10", "train", data_dir=str(tmp_path / "nope"), global_batch_size=4)
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    ip.make_image_pipeline("cifar10", "train", data_dir=data_dir, global_batch_size=4, process_index=0,
                           process_count=3)
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    ip.make_image_pipeline("cifar10", "validation", data_dir=data_dir, global_batch_size=4,
                           process_index=0, process_count=1)
  tf_dir = tmp_path / "tfrecord" / "cifar10" / "3.0.2"
  tf_dir.mkdir(parents=True)
  with open(os.path.join(data_dir, "cifar10", "3.0.2", "dataset_info.json")) as f:
    info = json.load(f)
  (tf_dir / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  with pytest.raises(ValueError, match="prepared as 'tfrecord'.*--file_format=array_record"):
    ip.make_image_pipeline("cifar10", "train", data_dir=str(tmp_path / "tfrecord"), global_batch_size=4,
                           process_index=0, process_count=1)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    ip.make_image_pipeline("cifar10", "test", data_dir=data_dir, global_batch_size=12, num_epochs=1,
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
    it = ip.make_image_pipeline(name, split, data_dir=data_dir, global_batch_size=8, seed=0,
                                image_size=image_size, process_index=0, process_count=1)
    bs = take(it, 6)  # 48 > 40: into the second epoch
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
