"""DMD2's real data for the GAN critic (``dmd_jax/data/real.py``, docs/method.md §7) on real components: runs
built by ``train.setup`` from the ``:tiny`` configs (random-weight teachers written under the workdir) and the
tiny prepared tfds datasets of ``tests/tfds_testing.py`` (the real ArrayRecord read and decode path)."""
import dataclasses
import glob
import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import tfds_testing
from fixture_testing import rel_err
from helpers import ROOT, env_with_devices, read_shards
from dmd_jax import config_lib, streams, train
from dmd_jax.data import input_pipeline as ip
from dmd_jax.data import real
from dmd_jax.data.pairs import PairStore
from dmd_jax.data.toy import GaussianMixture


def load_config(name: str, variant: str):
  config = config_lib.load(name, variant)
  if "regression" in config and "distance" in config.regression:
    config.regression.distance = "l2"    # no LPIPS network: nothing here reads it
  return config


def real_cfg(**kw):
  c = dict(source="tfds", dataset="cifar10", split="train", data_dir="", image_size=0, num_images=0, shard_size=0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def with_real_data(run, **kw):
  """``run`` whose config carries ``gan.real_data`` (as the trainer will see it); returns that block."""
  if "gan" not in run.config:
    run.config.gan = ml_collections.ConfigDict()
  run.config.gan.real_data = real_cfg(**kw)
  return run.config.gan.real_data


def assert_batches_equal(a, b):
  assert sorted(a) == sorted(b) == ["real_cond", "real_x"]
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
    np.testing.assert_array_equal(a[k], b[k])


def check_rows_and_resume(make, batch_size, steps=4):
  """Process-count independence (two halves = the one-process global batch) and exact resume: a source
  restored from the state saved after batch(s - 1) gives the uninterrupted run's batch(s), ...; returns the
  uninterrupted batches."""
  full = slice(0, batch_size)
  halves = (slice(0, batch_size // 2), slice(batch_size // 2, batch_size))
  a = make()
  ref, saved = [], None
  for s in range(steps):
    ref.append(a.batch(s, batch_size, full))
    if s == 1:
      saved = json.loads(json.dumps(a.state()))    # what the checkpoint metadata holds at step 2
  assert saved["next_step"] == 2 and saved["batch_size"] == batch_size
  assert a.state()["next_step"] == steps
  b = make()
  b.restore(saved)
  for s in range(2, steps):
    assert_batches_equal(b.batch(s, batch_size, full), ref[s])
  two = [make(), make()]   # two "processes", each asking for its rows only
  for s in range(steps):
    parts = [p.batch(s, batch_size, r) for p, r in zip(two, halves)]
    assert_batches_equal({k: np.concatenate([q[k] for q in parts]) for k in parts[0]}, ref[s])
  # a resumed run asking for another step than the saved one, and a state of other data, are errors
  c = make()
  c.restore(saved)
  with pytest.raises(ValueError, match="restored at step 2 .* asked for step 3"):
    c.batch(3, batch_size, full)
  with pytest.raises(ValueError, match=r"belongs to other real data; differing settings \(saved, now\): seed="):
    make().restore({**saved, "seed": [saved["seed"][0] + 1, saved["seed"][1]]})
  d = make()
  d.restore(saved)
  with pytest.raises(ValueError, match=f"real batch size changed from {batch_size} to {2 * batch_size}"):
    d.batch(2, 2 * batch_size, slice(0, 2 * batch_size))
  return ref


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tfds_testing.prepare(str(tmp_path_factory.mktemp("tfds")))


# ---------------------------------------------------------------------------------------------------------
# 'mixture': the toy
# ---------------------------------------------------------------------------------------------------------

def test_mixture(tmp_path):
  run = train.setup(load_config("toy2d", "unequal"), str(tmp_path))
  cfg = with_real_data(run, source="mixture")
  make = lambda: real.make_real_data(run, cfg)
  ref = check_rows_and_resume(make, 64)
  assert ref[0]["real_x"].shape == (64, 2) and ref[0]["real_x"].dtype == np.float32
  assert ref[0]["real_cond"].dtype == np.int32 and not ref[0]["real_cond"].any()
  assert not np.array_equal(ref[0]["real_x"], ref[1]["real_x"])             # steps differ
  seed = make().state()["seed"]
  assert seed == list(streams.numpy_seed(0, "real_data"))
  with pytest.raises(ValueError, match="differing settings .* mixture="):                # another mixture
    make().restore({**make().state(), "mixture": {"weights": [1.0], "means": [[0.0, 0.0]], "std": 1.0}})
  # statistics of 8 × 4096 draws against the true mixture (weights ∝ 1..8 on the unit circle, std 0.05)
  m = GaussianMixture.from_config(run.config.toy)
  x = np.concatenate([make().batch(s, 4096, slice(0, 4096))["real_x"] for s in range(8)]).astype(np.float64)
  mean = m.weights @ m.means
  assert np.abs(mean).max() > 0.2                                            # the test can see a bias
  np.testing.assert_allclose(x.mean(0), mean, atol=0.02)                     # 4 standard errors (0.005)
  np.testing.assert_allclose((x ** 2).sum(1).mean(), 1 + 2 * m.std ** 2, atol=0.01)
  nearest = np.argmin(((x[:, None] - m.means[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(np.bincount(nearest, minlength=8) / len(x), m.weights, atol=0.01)
  np.testing.assert_allclose(np.linalg.norm(x - m.means[nearest], axis=1).std(), 0.05 * 0.655, rtol=0.1)


def test_mixture_and_source_errors(tmp_path):
  run = train.setup(load_config("toy2d", "default"), str(tmp_path))
  with pytest.raises(ValueError, match=r"gan.real_data.source must be one of 'mixture', 'tfds', 'coco_latents', "
                                       r"'digits', got 'imagenet'"):
    real.make_real_data(run, real_cfg(source="imagenet"))
  with pytest.raises(ValueError, match="source='tfds' feeds pixel teachers.*needs 'mixture'"):
    real.make_real_data(run, real_cfg(source="tfds"))
  with pytest.raises(ValueError, match="source='coco_latents' needs a text-to-image teacher.*'toy'"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="coco_captions"))
  with pytest.raises(ValueError, match="not a real-data state"):
    real.make_real_data(run, real_cfg(source="mixture")).restore({"next_step": 3})


# ---------------------------------------------------------------------------------------------------------
# 'tfds': pixel teachers (tiny EDM teachers take 16x16 samples: CIFAR's 32 and ImageNet's 64 are resized)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edm_runs(tmp_path_factory):
  return {f"{name}:{variant}": train.setup(load_config(name, variant), str(tmp_path_factory.mktemp(name)))
          for name, variant in (("cifar10", "tiny"), ("cifar10", "uncond,tiny"), ("imagenet64", "tiny"))}


def _resized(image: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.uint8)


@pytest.mark.parametrize("config,dataset", [("cifar10:tiny", "cifar10"), ("cifar10:uncond,tiny", "cifar10"),
                                            ("imagenet64:tiny", "imagenet_resized/64x64")])
def test_tfds_images(edm_runs, data_dir, config, dataset):
  run = edm_runs[config]
  cfg = with_real_data(run, source="tfds", dataset=dataset, data_dir=data_dir)
  make = lambda: real.make_real_data(run, cfg)
  b = 8
  ref = check_rows_and_resume(make, b)
  src = ip.open_source(dataset, "train", data_dir)
  n, size = tfds_testing.N_TRAIN[dataset], src[0]["image"].shape[0]
  assert run.teacher.sample_shape == (16, 16, 3) and size in (32, 64)
  order = np.concatenate([make().indices(s, b) for s in range(4)])
  assert sorted(order[:n]) == list(range(n))                               # epoch 0: every record once
  conditional = "uncond" not in config
  for s, got in enumerate(ref):
    x, cond = got["real_x"], got["real_cond"]
    assert x.shape == (b, 16, 16, 3) and x.dtype == np.float32 and cond.shape == (b,) and cond.dtype == np.int32
    assert -1 <= x.min() and x.max() <= 1
    idx = order[s * b:(s + 1) * b]
    want = np.stack([_resized(src[int(i)]["image"], 16) for i in idx]).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(x, want, atol=1e-6, rtol=0)                 # PIL bicubic 32 / 64 → 16, [-1, 1]
    labels = [int(src[int(i)]["label"]) for i in idx]
    np.testing.assert_array_equal(cond, labels if conditional else np.zeros(b))
  if conditional:
    assert len(set(np.concatenate([g["real_cond"] for g in ref]).tolist())) > 3   # real labels, not zeros
  st = make().state()
  assert st["source"] == "tfds" and st["dataset"] == dataset and st["num_records"] == n


def test_tfds_errors(edm_runs, data_dir, tmp_path):
  run = edm_runs["cifar10:tiny"]                        # 10 classes
  empty = str(tmp_path / "no_tfds")
  os.makedirs(empty)
  with pytest.raises(FileNotFoundError) as e:           # input_pipeline's error, prefixed with the config keys
    real.make_real_data(run, real_cfg(dataset="cifar10", data_dir=empty))
  msg = str(e.value)
  assert "gan.real_data.dataset='cifar10'" in msg and f"data_dir={empty!r}" in msg
  assert "tfds build cifar10" in msg and os.path.join(empty, "cifar10") in msg
  with pytest.raises(ValueError, match="gan.real_data.dataset: unknown dataset 'mnist'"):
    real.make_real_data(run, real_cfg(dataset="mnist", data_dir=data_dir))
  with pytest.raises(ValueError, match=r"'imagenet_resized/64x64' has 1000 classes, more than the teacher's 10"):
    real.make_real_data(run, real_cfg(dataset="imagenet_resized/64x64", data_dir=data_dir))
  with pytest.raises(ValueError, match="'coco_captions' has no labels; the teacher .* is class-conditional"):
    real.make_real_data(run, real_cfg(dataset="coco_captions", data_dir=data_dir))
  with pytest.raises(ValueError, match="needs a text-to-image teacher.*'edm'"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="coco_captions", data_dir=data_dir))
  with pytest.raises(ValueError, match="draws from config.toy.*'edm'"):
    real.make_real_data(run, real_cfg(source="mixture"))
  rd = real.make_real_data(run, real_cfg(dataset="cifar10", data_dir=data_dir))
  with pytest.raises(ValueError, match=r"dataset='cifar10' \(split 'train'\) gives 23 real records, fewer than "
                                       "the global real batch of 32"):
    rd.batch(0, 32, slice(0, 32))


# ---------------------------------------------------------------------------------------------------------
# 'coco_latents': Stable Diffusion (configs/coco.py:tiny: 8x8x4 latents of 16 px images)
# ---------------------------------------------------------------------------------------------------------

def _centre_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  s = min(h, w)
  crop = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.uint8)


def _shards(folder):
  return read_shards(folder)


def test_coco_latents(tmp_path, data_dir, monkeypatch):
  run = train.setup(load_config("coco", "tiny"), str(tmp_path / "run"))
  n, b = 6, 4
  cfg = with_real_data(run, source="coco_latents", dataset="coco_captions", data_dir=data_dir, num_images=n,
                       shard_size=4)
  rd = real.make_real_data(run, cfg)
  folder = os.path.join(run.workdir, "real_latents")
  shards = _shards(folder)
  assert sorted(shards) == ["shard-00000", "shard-00001"]
  spec = json.load(open(os.path.join(folder, "spec.json")))
  assert spec["num_pairs"] == n and spec["image_size"] == 16 and spec["split"] == "train"
  assert spec["sample_shape"] == [8, 8, 4] and spec["teacher"] == os.path.join(run.workdir, "random_sd")
  index = np.concatenate([s["index"] for s in shards.values()])
  latents = np.concatenate([s["x"] for s in shards.values()])
  np.testing.assert_array_equal(index, np.arange(n))
  assert latents.shape == (n, 8, 8, 4) and latents.dtype == np.float32

  # the latents are Teacher.encode of the centre-cropped, resized first n records, computed here directly
  src = ip.open_source("coco_captions", "train", data_dir)
  images = np.stack([_centre_crop_resize(src[i]["image"], 16) for i in range(n)]).astype(np.float32) / 127.5 - 1
  want = np.asarray(jax.jit(run.teacher.encode)(run.frozen, images))
  assert rel_err(latents, want) <= 1e-5 and np.abs(want).max() > 0.1
  # each image's condition is the text embedding of its first caption
  first = [src[i]["captions"]["text"][0] for i in range(n)]
  first = [t.decode() if isinstance(t, bytes) else str(t) for t in first]
  assert rd.captions == first and all(c.startswith("caption 0 of image ") for c in first)
  embeddings = run.teacher.conditions.encode_text(first)
  assert embeddings.shape == (n, 16, 32)

  make = lambda: real.make_real_data(run, cfg)
  ref = check_rows_and_resume(make, b)
  for s, got in enumerate(ref):
    idx = rd.indices(s, b)
    assert got["real_x"].dtype == got["real_cond"].dtype == np.float32
    np.testing.assert_array_equal(got["real_x"], latents[idx])
    assert rel_err(got["real_cond"], embeddings[idx]) <= 1e-5
  assert _shards(folder).keys() == shards.keys()                         # opened again, not rebuilt

  # a shard lost and a half-written one left by a killed writer: the rebuild writes exactly the lost one
  inode0 = os.stat(os.path.join(folder, "shard-00000.x.npy")).st_ino
  for lost in glob.glob(os.path.join(folder, "shard-00001.*")):
    os.remove(lost)
  stale = os.path.join(folder, ".tmp-p0-999999999-0123abcd-shard-00001.x.npy")
  open(stale, "wb").write(b"half a shard")
  make()
  assert not os.path.exists(stale) and os.stat(os.path.join(folder, "shard-00000.x.npy")).st_ino == inode0
  again = _shards(folder)
  for k in shards:
    for f in shards[k]:
      np.testing.assert_array_equal(again[k][f], shards[k][f])

  # a build killed after its first shard (in another workdir) resumes at the second: the same shards
  other = types.SimpleNamespace(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)})
  other.workdir = str(tmp_path / "other")
  os.makedirs(other.workdir)
  write_shard, written = PairStore.write_shard, []

  def killed_after_one(store, i, arrays):
    if written:
      raise KeyboardInterrupt("killed")
    written.append(i)
    write_shard(store, i, arrays)

  monkeypatch.setattr(PairStore, "write_shard", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    real.make_real_data(other, cfg)
  other_folder = os.path.join(other.workdir, "real_latents")
  assert written == [0] and sorted(os.listdir(other_folder)) == ["shard-00000.index.npy", "shard-00000.x.npy",
                                                                 "spec.json"]
  monkeypatch.setattr(PairStore, "write_shard", write_shard)
  real.make_real_data(other, cfg)
  resumed = _shards(other_folder)
  assert resumed.keys() == shards.keys()
  for k in shards:
    for f in shards[k]:
      np.testing.assert_array_equal(resumed[k][f], shards[k][f])

  # errors: a spec mismatch names the folder; too few images for the batch or in the split
  with pytest.raises(ValueError, match=f"(?s)real latents in {folder} were built with a different spec; .*"
                                       "num_images=6/5.*delete"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="coco_captions", data_dir=data_dir,
                                      num_images=5, shard_size=4))
  with pytest.raises(ValueError, match="gan.real_data.num_images=6 gives 6 real records, fewer than the global "
                                       "real batch of 8"):
    rd.batch(0, 8, slice(0, 8))
  with pytest.raises(ValueError, match=r"num_images=8\): coco_captions split 'train' has 7 images, fewer than"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="coco_captions", data_dir=data_dir,
                                      num_images=8, shard_size=4))
  with pytest.raises(ValueError, match="dataset must be 'coco_captions', got 'cifar10'"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="cifar10", num_images=4, shard_size=4))
  with pytest.raises(ValueError, match="source='tfds' feeds pixel teachers.*needs 'coco_latents'"):
    real.make_real_data(run, real_cfg(source="tfds", dataset="coco_captions", data_dir=data_dir))
  with pytest.raises(ValueError, match=r"image_size=12: images of 12x12 encode to \(6, 6, 4\), not the teacher's"):
    real.make_real_data(run, real_cfg(source="coco_latents", dataset="coco_captions", data_dir=data_dir,
                                      num_images=4, shard_size=4, image_size=12))

  # the same store and batches built on 4 devices (one process: rows padded to the device count, encoded over
  # the mesh, gathered), in a subprocess that can emulate them
  out = tmp_path / "four_devices.npz"
  script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import numpy as np, test_real_data as t\nfrom absl import logging\nlogging.set_verbosity('info')\n"
            "from dmd_jax import train\nfrom dmd_jax.data import real\n"
            f"run = train.setup(t.load_config('coco', 'tiny'), {str(tmp_path / 'four')!r})\n"
            "assert run.mesh.devices.size == 4\n"
            f"cfg = t.with_real_data(run, source='coco_latents', dataset='coco_captions', data_dir={data_dir!r}, "
            f"num_images={n}, shard_size=4)\n"
            f"rd = real.make_real_data(run, cfg)\n"
            f"np.savez({str(out)!r}, x=np.stack([rd.batch(s, {b}, slice(0, {b}))['real_x'] for s in range(4)]))\n")
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env_with_devices(4, fast_compile=True),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "real latents: 6/6 images  shard 2/2 written" in p.stderr
  four = _shards(str(tmp_path / "four" / "real_latents"))
  assert four.keys() == shards.keys()
  assert rel_err(np.concatenate([s["x"] for s in four.values()]), latents) <= 1e-5
  assert rel_err(np.load(out)["x"], np.stack([g["real_x"] for g in ref])) <= 1e-5
