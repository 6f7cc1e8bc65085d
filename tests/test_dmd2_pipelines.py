"""The ``:dmd2`` EDM configs with their ``:tiny`` random-weight teachers and tiny prepared tfds datasets
(tests/tfds_testing.py) as the critic's real data. The toy's ``:dmd2`` run and the exactness of the resume are in
tests/test_dmd2.py; SD's stage 1 → stage 2 is in tests/test_sd_pipeline.py."""
import json
import os

import numpy as np
import pytest

from helpers import NO_EVALS_EDM, ROOT, run_main

import tfds_testing


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tfds_testing.prepare(str(tmp_path_factory.mktemp("tfds")))


def _runner(workdir, config, tfds_dir):
  def run(*args, variant="", **kw):
    return run_main(f"--workdir={workdir}", f"--config.gan.real_data.data_dir={tfds_dir}", *args,
                    config=os.path.join(ROOT, "configs", config + variant), timeout=900, **kw)
  return run


@pytest.mark.slow
def test_cifar10_dmd2_tiny(tmp_path, tfds_dir):
  """GAN head on the DDPM++ encoder output, real CIFAR-10 images and labels, two time-scale rule 5."""
  run = _runner(tmp_path, "cifar10.py:tiny,dmd2", tfds_dir)
  p = run("--config.num_train_steps=3", *NO_EVALS_EDM)
  assert "real data: cifar10[train], 23 records (32x32 images, resized to 16x16)" in p.stderr
  assert not os.path.exists(tmp_path / "pairs")              # DMD2: no regression pairs
  log = p.stderr
  assert "gan_generator_loss=" in log and "gan_critic_loss=" in log and "skipped_steps=0" in log
  p = run("--config.num_train_steps=6", *NO_EVALS_EDM)
  assert "resumed from" in p.stderr and "at step 3" in p.stderr
  out = tmp_path / "s.npz"
  run("--mode=sample", "--num_samples=5", f"--output={out}")
  with np.load(out) as f:
    assert f["samples"].dtype == np.uint8 and f["samples"].shape == (5, 16, 16, 3)
    assert int(f["step"]) == 6 and int(f["nfe"]) == 1 and f["labels"].max() < 10
  run("--mode=eval")
  res = json.load(open(tmp_path / "eval_step6.json"))
  assert res["fid_num_samples"] == 16 and np.isfinite(res["fid"]) and res["generator_nfe"] == 1


@pytest.mark.slow
def test_imagenet64_dmd2_tiny_stages(tmp_path, tfds_dir):
  """The model zoo's FID-1.28 path at :tiny sizes: ``:ttur`` (no GAN, TTUR 5), then ``:dmd2,stage2`` as a new
  run initialised from its checkpoint (the head on the ADM encoder output — the official 768×8×8 at full size —
  new, real ImageNet-64 images resized to the tiny teacher's 16 px) → sample → eval; ``:dmd2`` (GAN from
  scratch) trains too."""
  ttur, stage2, gan = tmp_path / "ttur", tmp_path / "stage2", tmp_path / "dmd2"
  p = _runner(ttur, "imagenet64.py:tiny", tfds_dir)("--config.num_train_steps=2", *NO_EVALS_EDM,
                                                   variant=",ttur")
  assert "gan_generator_loss=" not in p.stderr and "skipped_steps=0" in p.stderr
  run = _runner(stage2, "imagenet64.py:tiny", tfds_dir)
  p = run("--config.num_train_steps=3", *NO_EVALS_EDM, f"--config.init_from.workdir={ttur}",
          variant=",dmd2,stage2")
  assert f"initialised from checkpoint 2 of {ttur}" in p.stderr and "a new GAN head" in p.stderr
  assert "imagenet_resized/64x64[train], 10 records (64x64 images, resized to 16x16)" in p.stderr
  assert "gan_generator_loss=" in p.stderr and "skipped_steps=0" in p.stderr
  assert json.load(open(stage2 / "metrics.json"))["steps"] == 3
  out = tmp_path / "s.npz"
  run("--mode=sample", "--num_samples=3", f"--output={out}", variant=",dmd2,stage2")
  with np.load(out) as f:
    assert f["samples"].shape == (3, 16, 16, 3) and int(f["step"]) == 3 and f["labels"].max() < 1000
  run("--mode=eval", variant=",dmd2,stage2")
  res = json.load(open(stage2 / "eval_step3.json"))
  assert np.isfinite(res["fid"]) and res["generator_nfe"] == 1
  p = _runner(gan, "imagenet64.py:tiny", tfds_dir)("--config.num_train_steps=2", *NO_EVALS_EDM,
                                                  variant=",dmd2")
  assert "gan_generator_loss=" in p.stderr and "initialised from" not in p.stderr
