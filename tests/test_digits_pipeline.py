"""``configs/digits.py:tiny`` end to end (docs/digits.md), in this process: the teacher trained here (resumed
exactly), then DMD (regression pairs from its Heun sampler), DMD2 with the four-step generator (GAN on the real
digits), sampling, and the digits metrics of the trained and of the untrained generator (the teacher's
one Euler step). The metrics themselves are tested in tests/test_digits_metrics.py."""
import json
import os

import numpy as np
import pytest

from configs import digits as digits_config
from dmd_jax import checkpoint, modes, teacher_train, train
from dmd_jax.families.edm.convert import load_converted_edm

METRICS = ("fid", "class_accuracy", "precision", "recall", "near_copies")


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  result = teacher_train.train(digits_config.get_config("tiny"), str(root / "full"))   # 40 steps at once
  assert result["steps"] == 40 and np.isfinite(result["final_loss"])
  return root


def test_teacher_training_resumes_exactly_and_writes_a_converted_teacher(teacher_root):
  c = digits_config.get_config("tiny")
  c.teacher_train.steps = 20                                  # a run stopped at step 20 (its checkpoint) ...
  teacher_train.train(c, str(teacher_root / "split"))
  c.teacher_train.steps = 40                                  # ... and resumed to 40
  assert checkpoint.Checkpointer(str(teacher_root / "split" / "teacher_train")).latest_step() == 20
  teacher_train.train(c, str(teacher_root / "split"))
  assert teacher_train.train(c, str(teacher_root / "split")) is None   # finished: nothing to do
  full, split = (teacher_root / name / "teacher" for name in ("full", "split"))
  with np.load(full / "params.npz") as a, np.load(split / "params.npz") as b:
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files) <= 1e-6
  module, params = load_converted_edm(str(full))          # the converted-teacher format
  assert (module.img_resolution, module.img_channels, module.label_dim) == (16, 1, 10)
  assert json.load(open(full / "config.json"))["init_kwargs"] == json.loads(c.teacher_train.init_kwargs)
  assert os.path.getsize(teacher_root / "full" / "teacher_samples.png") > 100


def _check_digits(res, num):
  d = res["digits"]
  assert d["num_samples"] == num and np.isfinite(d["fid"]) and d["fid"] > 0
  for k in METRICS[1:]:
    assert 0.0 <= d[k] <= 1.0
  floor = d["real_floor"]
  assert floor["fid"] < d["fid"] and floor["class_accuracy"] > 0.9
  return d


def test_dmd_and_dmd2_four_steps_train_sample_and_evaluate(teacher_root, tmp_path):
  teacher = str(teacher_root / "full" / "teacher")
  c = digits_config.get_config("dmd,tiny")
  c.teacher.path = teacher
  c.evals.digits.teacher = True
  res = train.train(c, str(tmp_path / "dmd"))
  assert sorted(os.listdir(tmp_path / "dmd" / "pairs")) == [f"shard-0000{i}.{k}.npy" for i in (0, 1)
                                                             for k in ("cond", "index", "x", "z")] + ["spec.json"]
  d = _check_digits(res, 64)
  assert res["teacher_nfe"] == 7 and d["teacher"]["num_samples"] == 64 and res["steps"] == 6
  out = str(tmp_path / "s.npz")
  modes.sample(c, str(tmp_path / "dmd"), 5, out, seed=0)
  with np.load(out) as f:
    assert f["samples"].dtype == np.uint8 and f["samples"].shape == (5, 16, 16, 1)
    assert int(f["step"]) == 6 and int(f["nfe"]) == 1 and f["labels"].max() < 10
  init = modes.evaluate(c, str(tmp_path / "dmd"), at_init=True)     # the teacher's one Euler step
  assert init["step"] == 0 and json.load(open(tmp_path / "dmd" / "eval_init.json"))["step"] == 0
  assert init["digits"]["fid"] != d["fid"]

  c2 = digits_config.get_config("dmd2,steps4,tiny")
  c2.teacher.path = teacher
  assert c2.gan.real_data.source == "digits" and c2.regression.weight == 0
  c2.num_train_steps = 4        # (the resume of DMD2's real-data state: tests/test_dmd2*.py)
  c2.evals.grid.type = ""
  res2 = train.train(c2, str(tmp_path / "dmd2"))
  assert res2["steps"] == 4 and res2["generator_nfe"] == 4 and not os.path.exists(tmp_path / "dmd2" / "pairs")
  _check_digits(res2, 64)


def test_clear_errors(monkeypatch, tmp_path):
  import sys
  from dmd_jax.data import digits
  c = digits_config.get_config("dmd,tiny")                     # no teacher.path: convert or train one
  with pytest.raises(ValueError, match=r"teacher.path is empty: .*--mode=teacher_train"):
    train.train(c, str(tmp_path / "no_teacher"))
  c = digits_config.get_config("tiny")
  c.teacher_train.dataset = "mnist"
  with pytest.raises(ValueError, match="teacher_train.dataset must be 'digits', got 'mnist'"):
    teacher_train.train(c, str(tmp_path / "t"))
  with pytest.raises(ValueError, match="digits image size must be an integer >= 8"):
    digits.load(6)
  monkeypatch.setitem(sys.modules, "sklearn", None)            # scikit-learn not installed
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  digits.load.cache_clear()
  try:
    with pytest.raises(ImportError, match=r"pip install -e '\.\[digits\]'"):
      digits.load(16)
  finally:
    digits.load.cache_clear()
