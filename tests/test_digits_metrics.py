"""The digits metrics (dmd_jax/evaluation/digits.py): the classifier (accuracy, cache, exact resume), the
metrics on sets whose answers are known, and the evaluator's scalars and JSON on a stand-in run."""
import json
import shutil
import types

import ml_collections
import numpy as np
import pytest

from dmd_jax.config_lib import digits_eval
from dmd_jax.data import digits
from dmd_jax.evaluation import digits as dm
from dmd_jax.evaluation import evaluators, sampling
from dmd_jax.families.base import ClassLabels

STEPS = 80   # 0.969 held-out accuracy (the default 500 steps: 0.986); enough for these tests


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_classifier"))


@pytest.fixture(scope="module")
def clf(clf_dir):
  return dm.train_classifier(clf_dir, steps=STEPS, checkpoint_every=0)


@pytest.fixture(scope="module")
def ref(clf):
  return dm.reference(clf.module, clf.params)


def _equal_trees(a, b):
  import jax
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_classifier_accuracy_and_cache(clf, clf_dir):
  assert not clf.info["loaded"]
  assert clf.info["held_out_accuracy"] >= 0.95
  assert clf.info["num_held_out"] == 359 and clf.info["steps"] == STEPS
  info = json.load(open(f"{clf_dir}/{dm.INFO_FILE}"))
  assert info["held_out_accuracy"] == clf.info["held_out_accuracy"]
  calls = []
  again = dm.train_classifier(clf_dir, steps=STEPS, checkpoint_every=0, on_step=calls.append)
  assert again.info["loaded"] and calls == []   # no training step ran
  _equal_trees(again.params, clf.params)
  with pytest.raises(ValueError, match=r"steps=80 there, 81 asked"):
    dm.train_classifier(clf_dir, steps=STEPS + 1)


def test_classifier_resume_is_exact(tmp_path):
  steps, every, kill_at = 24, 8, 19
  whole = dm.train_classifier(str(tmp_path / "whole"), steps=steps, checkpoint_every=every)
  assert not (tmp_path / "whole" / dm.CHECKPOINT_FOLDER).exists()   # removed once finished

  class Killed(Exception):
    pass

  def kill(done):
    if done == kill_at:
      raise Killed

  with pytest.raises(Killed):
    dm.train_classifier(str(tmp_path / "cut"), steps=steps, checkpoint_every=every, on_step=kill)
  assert (tmp_path / "cut" / dm.CHECKPOINT_FOLDER).exists() and not (tmp_path / "cut" / dm.INFO_FILE).exists()
  with pytest.raises(ValueError, match="seed=0 there, 1 asked"):   # a checkpoint of other settings
    dm.train_classifier(str(tmp_path / "cut"), steps=steps, seed=1, checkpoint_every=every)
  seen = []
  resumed = dm.train_classifier(str(tmp_path / "cut"), steps=steps, checkpoint_every=every, on_step=seen.append)
  assert seen == list(range(2 * every + 1, steps + 1))   # resumed after the checkpoint of step 16
  _equal_trees(resumed.params, whole.params)
  assert resumed.info["held_out_accuracy"] == whole.info["held_out_accuracy"]


def test_bad_images(clf):
  with pytest.raises(ValueError, match=r"\[N, 16, 16, 1\]"):
    dm.features(clf.module, clf.params, np.zeros((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="floating point"):
    dm.features(clf.module, clf.params, np.zeros((4, 16, 16, 1), np.uint8))


def test_real_floor_and_noise(clf, ref):
  floor = dm.real_floor(clf.module, clf.params)
  assert floor["num_samples"] == 898
  assert 0.0 < floor["fid"] < 12.0           # measured 4.2 (this 80-step classifier; 16.6 with the default)
  assert floor["precision"] > 0.8 and floor["recall"] > 0.8
  assert floor["near_copies"] < 0.01         # the two halves share no image
  assert floor["class_accuracy"] >= 0.95
  noise = np.random.default_rng(0).uniform(-1, 1, (600, 16, 16, 1)).astype(np.float32)
  m = dm.digits_metrics(noise, None, clf.module, clf.params, ref=ref)
  assert m["fid"] > 10 * floor["fid"]
  assert m["precision"] <= 0.01 and m["class_accuracy"] is None
  assert m["near_copies"] == 0.0 and m["num_samples"] == 600


def test_set_against_itself(clf, ref):
  x, y = digits.load(16)
  m = dm.digits_metrics(x, y, clf.module, clf.params, ref=ref)
  assert m["precision"] == 1.0 and m["recall"] == 1.0
  assert abs(m["fid"]) < 1e-6
  assert m["near_copies"] == 1.0   # every training image is at distance 0 of itself
  p, r = dm.precision_recall(ref.features, ref.features[:500])
  assert p == 1.0 and r < 0.9      # a third of the set covers less of the manifold


def test_near_copies_threshold():
  x, _ = digits.load(16)
  tau = dm.near_copy_threshold(x)
  assert 0.3 < tau < 3.0            # measured 0.935 for the 1,797 digits at 16 x 16
  assert dm.near_copy_threshold(np.concatenate([x, x[:5]])) == tau   # exact duplicates are ignored
  rng = np.random.default_rng(1)
  d = rng.normal(size=x[:50].shape)
  small = x[:50] + 0.5 * tau * d / np.linalg.norm(d.reshape(50, -1), axis=1)[:, None, None, None]
  large = x[:50] + 1.5 * tau * d / np.linalg.norm(d.reshape(50, -1), axis=1)[:, None, None, None]
  assert dm.near_copies(small, x, tau) == (1.0, tau)
  frac, _ = dm.near_copies(large, x, tau)
  assert frac < 0.2
  assert dm.near_copies(rng.uniform(-1, 1, (100, 16, 16, 1)), x, tau)[0] == 0.0


def test_class_accuracy_held_out(clf):
  x, y = digits.load(16)
  _, held = digits.split()
  logits, _ = dm._forward(clf.module, clf.params, x[held])
  assert dm.class_accuracy(logits, y[held]) >= 0.95
  assert dm.class_accuracy(logits, (y[held] + 1) % 10) < 0.05


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.update({(step, k): v for k, v in scalars.items()})


def test_evaluator(clf_dir, tmp_path, monkeypatch):
  """The evaluator on a stand-in run whose 'generator' and 'teacher' return real digits."""
  workdir = tmp_path / "work"
  shutil.copytree(clf_dir, workdir / "digits_classifier")   # the classifier is reused, not retrained
  x, y = digits.load(16)
  calls = {"generate": 0, "teacher": 0}

  def fake(who, offset):
    def sample(run, *args):
      n = args[-2]
      calls[who] += 1
      idx = (np.arange(n) + offset) % len(x)
      return x[idx], y[idx]
    return sample
  monkeypatch.setattr(sampling, "generate", fake("generate", 0))
  monkeypatch.setattr(sampling, "teacher_samples", fake("teacher", 900))
  monkeypatch.setattr(sampling, "to_outputs", lambda run, v: v)
  config = ml_collections.ConfigDict({"seed": 0, "digits": {"classifier_steps": STEPS}})
  teacher = types.SimpleNamespace(sample_shape=(16, 16, 1), conditions=ClassLabels(10, 0))
  run = types.SimpleNamespace(config=config, workdir=str(workdir), teacher=teacher, cache={}, is_main=True)
  writer = _Writer()
  spec = ml_collections.ConfigDict(digits_eval(num_samples=400))
  spec.teacher = True
  ev = evaluators.EVALUATORS["digits"](run, writer, spec, "digits")
  periodic = ev.run(None, 5, final=False)["digits"]   # every_steps: the generator's metrics alone
  assert "teacher" not in periodic and "real_floor" not in periodic and periodic["num_samples"] == 400
  assert set(writer.scalars) == {(5, f"eval/digits/{k}") for k in periodic}
  writer.scalars.clear()
  out = ev.run(None, 7, final=True)
  json.dumps(out, allow_nan=False)
  d = out["digits"]
  names = {"fid", "class_accuracy", "precision", "recall", "near_copies", "near_copy_threshold", "num_samples"}
  assert names <= set(d) and names == set(d["teacher"]) == set(d["real_floor"])
  assert d["num_samples"] == 400 and d["near_copies"] == 1.0 and d["class_accuracy"] >= 0.95
  assert set(writer.scalars) == {(7, f"eval/digits/{k}") for k in names} | {
      (7, f"eval/digits/teacher/{k}") for k in names}
  assert writer.scalars[(7, "eval/digits/fid")] == d["fid"]
  cache = workdir / "digits_teacher_metrics_400.json"
  assert json.loads(cache.read_text()) == d["teacher"]
  assert calls == {"generate": 2, "teacher": 1}
  out2 = evaluators.EVALUATORS["digits"](run, _Writer(), spec, "digits").run(None, 8, final=True)
  assert calls == {"generate": 3, "teacher": 1}   # the teacher's metrics came from the cache
  assert out2["digits"]["teacher"] == d["teacher"]
  assert "digits_classifier" in run.cache
  assert not (workdir / "digits_classifier" / dm.CHECKPOINT_FOLDER).exists()
