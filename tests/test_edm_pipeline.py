"""The EDM image configs end to end on CPU with their :tiny random-weight teachers: regression pairs, training,
checkpoint, resume, one-step samples (uint8 NHWC + labels), teacher samples; and resumable pair generation."""
import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import FAST, ROOT, env_with_devices, main_cmd, read_pairs, read_shards, run_main

CONFIGS = {"cifar10": (os.path.join(ROOT, "configs", "cifar10.py:tiny"), 10),
           "cifar10_uncond": (os.path.join(ROOT, "configs", "cifar10.py:uncond,tiny"), 0),
           "imagenet64": (os.path.join(ROOT, "configs", "imagenet64.py:tiny"), 1000)}


# (cifar10:tiny's conditional DDPM++ runs end to end as DMD2 in tests/test_dmd2_pipelines.py)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet64", "cifar10_uncond"])
def test_tiny_config_end_to_end(tmp_path, name):
  config, num_classes = CONFIGS[name]
  run = lambda *a: run_main(f"--workdir={tmp_path}", *a, config=config, fast_compile=True, timeout=900)
  extra = ["--config.evals.fid.every_steps=2"] if name == "imagenet64" else []   # + a monitoring FID at step 2
  p = run("--config.num_train_steps=4", *extra)
  assert "compiled the train step" in p.stderr
  if extra:
    assert "monitoring FID (8 samples) at step 2" in p.stderr
  assert os.path.isdir(tmp_path / "random_lpips") and os.path.isdir(tmp_path / "random_inception")
  m = json.load(open(tmp_path / "metrics.json"))
  assert m["fid_num_samples"] == 16 and np.isfinite(m["fid"]) and m["fid"] >= 0
  pairs = read_shards(tmp_path / "pairs")
  assert len(pairs) == 3
  f = pairs["shard-00000"]
  assert f["z"].shape == (8, 16, 16, 3) and f["x"].shape == (8, 16, 16, 3)
  assert np.all(np.isfinite(f["x"]))
  if num_classes:
    assert f["cond"].dtype.kind == "i" and 0 <= f["cond"].min() and f["cond"].max() < num_classes
  else:   # unconditional teachers store the placeholder condition 0 (conditions are always arrays)
    assert f["cond"].dtype.kind == "i" and not f["cond"].any()
  assert os.path.isfile(tmp_path / "random_edm" / "params.npz")
  assert glob.glob(str(tmp_path / "samples" / "step4.png"))

  # an EDM run's resume: tests/test_dmd2_pipelines.py (cifar10:tiny,dmd2); --mode=eval (--at_init):
  # tests/test_digits_pipeline.py
  step = 4
  out = tmp_path / "s.npz"
  run("--mode=sample", "--num_samples=5", f"--output={out}", "--seed=3")
  with np.load(out) as f:
    assert f["samples"].dtype == np.uint8 and f["samples"].shape == (5, 16, 16, 3)
    assert int(f["step"]) == step
    if num_classes:
      assert f["labels"].shape == (5,) and f["labels"].max() < num_classes
    else:
      assert "labels" not in f.files
  if name == "cifar10_uncond":
    assert m["fid_protocol"] == "tf1" and os.path.exists(tmp_path / "fid_reference_teacher_16.npz")
    out_t = tmp_path / "t.npz"
    run("--mode=teacher_sample", "--num_samples=3", f"--output={out_t}")
    with np.load(out_t) as f:
      assert f["samples"].dtype == np.uint8 and f["samples"].shape == (3, 16, 16, 3)
      assert int(f["nfe"]) == 7


PAIRS = FAST + ["--config.regression.num_pairs=100000", "--config.regression.shard_size=500"]


def _pairs(workdir):
  return read_pairs(workdir)


def test_pair_generation_killed_and_resumed_on_8_devices_matches(tmp_path):
  ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
  run_main(f"--workdir={ref_dir}", "--mode=pairs", *PAIRS)
  proc = subprocess.Popen(main_cmd(f"--workdir={dir_}", "--mode=pairs", *PAIRS), cwd=ROOT,
                          env=env_with_devices(None), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while len(glob.glob(str(dir_ / "pairs" / "shard-*.index.npy"))) < 3:
    assert proc.poll() is None and time.time() - t0 < 300
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(glob.glob(str(dir_ / "pairs" / "shard-*.index.npy")))
  assert done < 200, "pair generation finished before the kill: the test proved nothing"
  p = run_main(f"--workdir={dir_}", "--mode=pairs", *PAIRS, devices=8)   # resume on another device count
  assert "100000 pairs" in p.stdout
  assert not [n for n in os.listdir(dir_ / "pairs") if ".tmp" in n]   # no temporaries left (hidden files too)
  a, b = _pairs(ref_dir), _pairs(dir_)
  np.testing.assert_array_equal(a["index"], np.arange(100000))
  np.testing.assert_array_equal(b["index"], a["index"])
  np.testing.assert_array_equal(b["z"], a["z"])          # the noise of pair i depends on (seed, i) only
  kept = done * 500                                       # shards written before the kill, on 1 device: exact
  np.testing.assert_array_equal(b["x"][:kept], a["x"][:kept])
  # shards written on 8 devices: the same per-sample ODE solve, vectorised differently -> float rounding, which
  # the Heun ODE amplifies for the rare noise that lands between two modes (std 0.05): with the named random
  # streams 2 of 100k pairs (one sample) differ by 1.1e-3, every other by < 2e-4
  err = np.abs(b["x"] - a["x"]).max(axis=1)
  assert np.mean(err < 2e-4) >= 0.9999 and err.max() < 5e-3, (np.sum(err >= 2e-4), err.max())


def test_pairs_with_another_spec_are_refused(tmp_path):
  run_main(f"--workdir={tmp_path}", "--mode=pairs", *FAST)
  p = run_main(f"--workdir={tmp_path}", "--mode=pairs", *FAST, "--config.regression.sampler_steps=10",
               check=False)
  assert p.returncode == 2 and "different spec" in p.stderr


def test_half_written_shards_never_count_and_are_cleaned(tmp_path):
  from dmd_jax.data.pairs import PairStore
  spec = {"num_pairs": 10, "shard_size": 4}
  store = PairStore(str(tmp_path), spec).open()
  assert store.missing_shards() == [0, 1, 2]
  store.write_shard(0, {"index": np.arange(4), "z": np.zeros((4, 2)), "x": np.zeros((4, 2))})
  stale = tmp_path / "shard-00001.x.npy.tmp-p0-999999"   # what a killed writer of earlier versions left
  stale.write_bytes(b"partial")
  assert store.missing_shards() == [1, 2]
  PairStore(str(tmp_path), spec).open()
  assert not stale.exists() and (tmp_path / "shard-00000.index.npy").exists()
  with pytest.raises(FileNotFoundError, match="2 of 3 regression-pair shards are missing"):
    store.load()
  with pytest.raises(ValueError, match="different spec"):
    PairStore(str(tmp_path), {"num_pairs": 12, "shard_size": 4}).open()


def test_a_store_in_the_old_npz_layout_is_rebuilt_and_a_damaged_file_is_an_error(tmp_path, caplog):
  from dmd_jax.data.pairs import PairStore
  spec = {"num_pairs": 6, "shard_size": 4}
  (tmp_path / "spec.json").write_text(json.dumps(spec))           # what earlier versions wrote: no shard format
  np.savez(tmp_path / "shard-00000.npz", index=np.arange(4), z=np.zeros((4, 2)), x=np.zeros((4, 2)))
  with caplog.at_level("WARNING"):
    store = PairStore(str(tmp_path), spec).open()
  assert "written in the .npz layout of earlier versions: rebuilding them" in caplog.text
  assert store.missing_shards() == [0, 1] and not (tmp_path / "shard-00000.npz").exists()
  assert json.loads((tmp_path / "spec.json").read_text()) == {**spec, "shard_format": "npy"}
  PairStore(str(tmp_path), spec).open()                             # now the same spec: opened as it is
  for i in range(2):
    idx = store.shard_indices(i)
    store.write_shard(i, {"index": idx, "x": np.ones((len(idx), 3), np.float32)})
  np.testing.assert_array_equal(store.load()["x"], np.ones((6, 3)))
  # a file cut short, or of another length, never stands in for its shard
  x1 = tmp_path / "shard-00001.x.npy"
  good = x1.read_bytes()
  x1.write_bytes(good[:-4])
  with pytest.raises(ValueError, match=r"shard-00001\.x\.npy is damaged.*delete it to rebuild its shard"):
    store.rows()
  np.save(x1, np.ones((3, 3), np.float32))
  with pytest.raises(ValueError, match=r"shard-00001\.x\.npy holds \(3, 3\) rows, not the shard's 2"):
    store.rows()


def test_pair_rows_read_only_the_rows_asked_for(tmp_path):
  """Training reads the regression set row by row from memory-mapped shards (each process its own rows)."""
  from dmd_jax.data.pairs import PairRows, PairStore
  store = PairStore(str(tmp_path), {"num_pairs": 10, "shard_size": 4}).open()
  rng = np.random.default_rng(0)
  full = {"index": np.arange(10), "z": rng.normal(size=(10, 3, 2)).astype(np.float32),
          "x": rng.normal(size=(10, 3, 2)).astype(np.float32), "cond": rng.integers(0, 5, 10).astype(np.int32)}
  for i in range(3):
    store.write_shard(i, {k: v[store.shard_indices(i)] for k, v in full.items()})
  rows = store.rows()
  assert isinstance(rows, PairRows) and len(rows) == 10 and set(rows.fields) == {"z", "x", "cond"}
  idx = np.array([9, 0, 4, 4, 7, 3])                      # across shards, out of order, repeated
  got = rows.take(idx)
  for k in ("z", "x", "cond"):
    np.testing.assert_array_equal(got[k], full[k][idx])
  assert all(isinstance(m["z"], np.memmap) for m in rows._maps)   # mapped, not loaded
  loaded = store.load()
  np.testing.assert_array_equal(loaded["x"], full["x"])
  (tmp_path / "shard-00002.index.npy").unlink()
  with pytest.raises(FileNotFoundError, match="1 of 3 regression-pair shards are missing"):
    store.rows()
