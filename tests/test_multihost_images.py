"""Multi-process runs of the :tiny image configs (launch/local.py, gloo CPU collectives on 127.0.0.1): imagenet64
training and coco evaluation across 2 processes against 1 process with jax.distributed initialised. In their own
file so that `pytest -n 2 --dist loadfile` runs them beside tests/test_multihost.py, not after it."""
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import NO_EVALS_EDM
from test_multihost import COCO_TINY, IMAGENET_TINY, LIMIT, ROOT, _env, _launch, _pairs, _state

# the slow set (docs/status.md "The tests"): still run by the README test command and CI, after the rest
pytestmark = pytest.mark.slow


def test_imagenet64_tiny_two_processes_equal_one_distributed_process(tmp_path):
  """Regression pairs (EDM Heun sampler over the mesh), LPIPS, the DM and fake-score updates, 2 steps (the
  warm-up's first step has learning rate 0): the pairs of 2 × 2 equal those of 1 × 4 bit for bit, and so do
  all state arrays (about 880) but 6: the output convolution's kernel of the generator and of the fake score
  and their Adam moments: their gradients differ in the last bits (relative <= 4e-7, measured), so
  one of their reductions is summed in another order across 2 processes than within 1."""
  args = ["--config.num_train_steps=2", "--config.regression.num_pairs=8", *NO_EVALS_EDM]
  times = {}
  for n, k in ((2, 2), (1, 4)):
    t0 = time.time()
    _launch(n, k, f"--workdir={tmp_path / f'{n}x{k}'}", *args, config=IMAGENET_TINY, fast_compile=True)
    times[f"{n}x{k}"] = round(time.time() - t0, 1)
  a, b = _pairs(tmp_path / "2x2"), _pairs(tmp_path / "1x4")
  assert a["x"].shape == (8, 16, 16, 3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  two, one = _state(tmp_path / "2x2", 2), _state(tmp_path / "1x4", 2)
  assert sorted(two) == sorted(one) and len(two) > 800
  different = {k: float(np.abs(two[k].astype(np.float64) - one[k]).max() / np.abs(one[k]).max())
               for k in two if not np.array_equal(two[k], one[k])}
  print(f"imagenet64:tiny, 2 steps: {times} s; {len(two) - len(different)} of {len(two)} state arrays "
        f"bit-identical; the others (relative difference): {different}")
  assert all("['out_conv']['kernel']" in k for k in different), different
  assert len(different) <= 6 and max(different.values(), default=0.0) < 1e-6, different


# A step-0 checkpoint of a config (its generator is the teacher's copy): what --mode=eval needs, without compiling
# a train step.
MAKE_CHECKPOINT = """
import sys
from absl import flags
from ml_collections import config_flags
config_flag = config_flags.DEFINE_config_file("config", None, "")
flags.FLAGS(["make_checkpoint", "--config=" + sys.argv[1]])
from dmd_jax import checkpoint, train
run = train.setup(config_flag.value, sys.argv[2])
ckpt = checkpoint.Checkpointer(run.workdir)
ckpt.save(0, run.init_state(), {"config": config_flag.value.to_json_best_effort(), "step": 0})
ckpt.wait()
ckpt.close()
"""


def test_coco_tiny_eval_across_two_processes_equals_one(tmp_path):
  """COCO evaluation (generator images for the captions, the teacher's reference images, random Inception
  FID and CLIP score; each process computes its share of the features) of a step-0 checkpoint: 2 processes
  × 2 devices and 1 process × 4 devices give the same FID reference statistics, FID and CLIP score."""
  d = tmp_path / "run"
  p = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, COCO_TINY, str(d)], cwd=ROOT,
                     env=_env(1, fast_compile=True), capture_output=True, text=True, timeout=LIMIT)
  assert p.returncode == 0, p.stderr[-4000:]
  results, times = {}, {}
  for n, k in ((2, 2), (1, 4)):
    for f in glob.glob(str(d / "fid_reference_*")):   # each evaluation computes its own reference
      os.remove(f)
    t0 = time.time()
    _launch(n, k, f"--workdir={d}", "--mode=eval", "--config.evals.grid.type=", config=COCO_TINY,
            fast_compile=True)
    times[f"{n}x{k}"] = round(time.time() - t0, 1)
    (ref,) = glob.glob(str(d / "fid_reference_teacher_8_*.npz"))
    results[n] = json.load(open(d / "eval_step0.json")), dict(np.load(ref))
  (two, ref_two), (one, ref_one) = results[2], results[1]
  assert two["num_samples"] == 8 and np.isfinite(two["fid"]) and 0 < two["clip_score"] <= 100
  assert (two["fid"], two["clip_score"]) == (one["fid"], one["clip_score"]), (two, one)
  assert sorted(ref_two) == sorted(ref_one)
  for key in ref_two:
    np.testing.assert_array_equal(ref_two[key], ref_one[key])
  print(f"coco:tiny eval: {times} s; fid {two['fid']!r}, clip_score {two['clip_score']!r}")
