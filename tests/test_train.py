"""The training loop as a user runs it: sharding on emulated devices, kill-and-resume, SIGTERM, modes, errors."""
import glob
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import FAST, ROOT, env_with_devices, main_cmd, run_main

STEPS = ["--config.num_train_steps=20", "--config.checkpoint_every=10"]


def _samples(workdir, out, devices=None, seed=0, n=256):
  run_main(f"--workdir={workdir}", "--mode=sample", f"--num_samples={n}", f"--output={out}", f"--seed={seed}",
           *FAST, devices=devices)
  return np.load(out)["samples"]


@pytest.mark.parametrize("devices,mesh", [(8, (4, 2)), (8, (8, 1))])
def test_sharded_runs_match_one_device(tmp_path, devices, mesh, one_device_run):
  d = tmp_path / "run"
  mesh_args = [f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
               "--config.mesh.min_shard_size=512"]
  p = run_main(f"--workdir={d}", *FAST, *STEPS, *mesh_args, devices=devices)
  log = p.stderr
  assert f"over {devices} devices" in log
  if mesh[1] > 1:   # the 32x32 weights and their Adam moments are split over fsdp
    n_sharded = int(log.split("; ")[1].split(" of ")[0]) if "; " in log else 0
    assert n_sharded >= 6, log[-2000:]
  x = _samples(d, tmp_path / "s.npz", devices=devices)
  ref, ref_metrics = one_device_run
  np.testing.assert_allclose(x, ref, atol=2e-5, rtol=0)
  m = json.load(open(d / "metrics.json"))
  assert m["steps"] == 20
  np.testing.assert_allclose(m["generator"]["tv"], ref_metrics["generator"]["tv"], atol=1e-3)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("one") / "run"
  run_main(f"--workdir={d}", *FAST, *STEPS, devices=1)
  x = _samples(d, d.parent / "s.npz", devices=1)
  return x, json.load(open(d / "metrics.json"))


RESUME = FAST + ["--config.num_train_steps=2000", "--config.checkpoint_every=100", "--config.log_every=500"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("full") / "run"
  run_main(f"--workdir={d}", *RESUME)
  return d, _samples(d, d.parent / "s.npz")


def _start_and_wait_for_checkpoint(workdir, step=100):
  proc = subprocess.Popen(main_cmd(f"--workdir={workdir}", *RESUME), cwd=ROOT, env=env_with_devices(None),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  target = os.path.join(workdir, "checkpoints", str(step))
  t0 = time.time()
  while not os.path.isdir(target):
    assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
    assert time.time() - t0 < 300
    time.sleep(0.02)
  return proc


def _latest_step(workdir):
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
           if os.path.basename(p).isdigit()]
  return max(steps)


def test_sigkill_and_resume_gives_the_uninterrupted_generator(tmp_path, uninterrupted):
  d = tmp_path / "run"
  proc = _start_and_wait_for_checkpoint(str(d))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _latest_step(d)
  assert killed_at < 2000, "the run finished before it was killed: the test proved nothing"
  assert not os.path.exists(d / "metrics.json")
  p = run_main(f"--workdir={d}", *RESUME)
  assert "resumed from" in p.stderr
  ref_dir, ref = uninterrupted
  np.testing.assert_array_equal(_samples(d, tmp_path / "s.npz"), ref)


def test_sigterm_saves_then_resume_matches(tmp_path, uninterrupted):
  d = tmp_path / "run"
  proc = _start_and_wait_for_checkpoint(str(d))
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 42, err[-3000:]     # distributed.PREEMPTED_EXIT_CODE: launchers restart on it
  assert "stopped by SIGTERM" in err
  stopped = _latest_step(d)
  assert 100 <= stopped < 2000
  run_main(f"--workdir={d}", *RESUME)
  ref_dir, ref = uninterrupted
  np.testing.assert_array_equal(_samples(d, tmp_path / "s.npz"), ref)


def test_finished_run_says_so_and_outputs_exist(uninterrupted):
  d, _ = uninterrupted
  p = run_main(f"--workdir={d}", *RESUME)
  assert "already finished at step 2000/2000" in p.stdout
  m = json.load(open(d / "metrics.json"))
  for who in ("generator", "teacher"):
    assert set(m[who]) >= {"tv", "precision", "mmd2_ratio", "mode_share"}
  assert m["teacher"]["precision"] > 0.99 and m["teacher_nfe"] == 35 and m["generator_nfe"] == 1
  assert glob.glob(str(d / "samples" / "*.png")) and glob.glob(str(d / "events.out.tfevents.*"))


def test_sample_mode_is_deterministic(tmp_path, uninterrupted):
  d, ref = uninterrupted
  a = _samples(d, tmp_path / "a.npz", seed=0)
  b = _samples(d, tmp_path / "b.npz", seed=1)
  assert a.shape == (256, 2) and a.dtype == np.float32
  np.testing.assert_array_equal(a, ref)
  assert np.abs(a - b).max() > 0.1


def test_eval_mode(tmp_path, uninterrupted):
  d, _ = uninterrupted
  p = run_main(f"--workdir={d}", "--mode=eval", *RESUME)
  res = json.load(open(d / "eval_step2000.json"))
  assert 0 <= res["generator"]["tv"] <= 1 and res["generator"]["mmd2_ratio"] > 0
  assert '"generator"' in p.stdout


def test_unknown_config_key_is_a_clear_error(tmp_path):
  p = run_main(f"--workdir={tmp_path}", "--config.optim.lrr=1e-3", check=False)
  assert p.returncode != 0
  assert "lrr" in p.stderr


def test_bad_workdir_is_a_clear_error(tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  p = run_main(f"--workdir={f}", *FAST, check=False)
  assert p.returncode == 2
  assert "exists and is not a directory" in p.stderr


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  p = run_main(f"--workdir={tmp_path}", "--mode=sample", f"--output={tmp_path}/x.npz", check=False)
  assert p.returncode == 2 and "no checkpoint" in p.stderr
