"""Multi-process training as a pod runs it, on this machine: ``launch/local.py`` starts N real processes
(``jax.distributed`` with an explicit coordinator on 127.0.0.1, process count and id; gloo CPU collectives),
each with K emulated CPU devices. The toy run is compared with 1 process × 8 devices with ``jax.distributed``
initialised (exact: the same programs) and with a plain 1 × 8 run (float tolerance: another summation order);
a checkpoint written by 2 processes is read by 1 and by 4; SIGTERM gives one consistent checkpoint, exit code 42
and an exact resume."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import FAST, ROOT, run_main

LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = FAST + ["--config.num_train_steps=60", "--config.checkpoint_every=20", "--config.log_every=20"]


def _local_cmd(n, k, *args):
  return [sys.executable, LOCAL, f"--num_processes={n}", f"--devices_per_process={k}", "--timeout=500", "--",
          "--config=" + os.path.join(ROOT, "configs", "toy2d.py"), *args]


def _launch(n, k, *args, check=True):
  p = subprocess.run(_local_cmd(n, k, *args), cwd=ROOT, capture_output=True, text=True, timeout=560)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDERR:\n{p.stderr[-6000:]}")
  return p


def _sample(workdir, out, launcher):
  args = (f"--workdir={workdir}", "--mode=sample", "--num_samples=256", f"--output={out}", "--seed=0", *FAST)
  launcher(*args)
  return np.load(out)["samples"]


def _pairs(workdir):
  files = sorted(glob.glob(os.path.join(workdir, "pairs", "shard-*.npz")))
  return {k: np.concatenate([np.load(f)[k] for f in files]) for k in ("index", "z", "x", "cond")}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp") / "run"
  t0 = time.time()
  p = _launch(2, 4, f"--workdir={d}", *TRAIN)
  seconds = time.time() - t0
  assert "process 1 of 2" in p.stderr and "over 8 devices" in p.stderr
  x = _sample(d, d.parent / "s.npz", lambda *a: _launch(2, 4, *a))
  return d, x, seconds


def test_two_processes_equal_one_distributed_process_and_plain_one(tmp_path, two_process_run):
  d2, x2, seconds = two_process_run
  d1 = tmp_path / "one"
  _launch(1, 8, f"--workdir={d1}", *TRAIN)             # 1 process, jax.distributed initialised
  x1 = _sample(d1, tmp_path / "s1.npz", lambda *a: _launch(1, 8, *a))
  np.testing.assert_array_equal(x2, x1)                 # the same programs: bit-identical
  a, b = _pairs(d2), _pairs(d1)                          # the regression set built by 2 processes = by 1
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  plain = tmp_path / "plain"
  run_main(f"--workdir={plain}", *TRAIN, devices=8)     # 1 × 8 without jax.distributed: other summation order
  xp = _sample(plain, tmp_path / "sp.npz", lambda *a: run_main(*a, devices=8))
  np.testing.assert_allclose(xp, x2, atol=1e-3, rtol=0)
  print(f"2 x 4 processes: {seconds:.0f} s; |plain 1x8 - 2x4| max {np.abs(xp - x2).max():.2e}")


def test_checkpoint_of_two_processes_restores_in_one_and_four(tmp_path, two_process_run):
  d2, x2, _ = two_process_run
  x_one = _sample(d2, tmp_path / "one.npz", lambda *a: run_main(*a, devices=1))
  np.testing.assert_allclose(x_one, x2, atol=1e-5, rtol=0)   # samples do not depend on the device count
  x_four = _sample(d2, tmp_path / "four.npz", lambda *a: _launch(4, 2, *a))
  np.testing.assert_allclose(x_four, x2, atol=1e-5, rtol=0)


def test_eval_across_two_processes_equals_one(tmp_path, two_process_run):
  d2, _, _ = two_process_run
  _launch(2, 4, f"--workdir={d2}", "--mode=eval", *TRAIN)
  import json
  two = json.load(open(d2 / "eval_step60.json"))
  os.remove(d2 / "eval_step60.json")
  run_main(f"--workdir={d2}", "--mode=eval", *TRAIN, devices=8)
  one = json.load(open(d2 / "eval_step60.json"))
  for who in ("generator", "teacher"):
    for k in ("tv", "precision", "min_mode_share"):
      assert abs(two[who][k] - one[who][k]) <= 2e-3, (who, k, two[who][k], one[who][k])


def test_sigterm_to_every_process_saves_one_checkpoint_and_resumes_exactly(tmp_path, two_process_run):
  _, x_ref, _ = two_process_run
  d = tmp_path / "run"
  proc = subprocess.Popen(_local_cmd(2, 4, f"--workdir={d}", *TRAIN), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not os.path.isdir(d / "checkpoints" / "20"):
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    assert time.time() - t0 < 300
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)                      # local.py forwards it to every process
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 42, err[-4000:]             # sharding.PREEMPTED_EXIT_CODE
  assert err.count("saves and stops after step") == 2 or err.count("stopped by SIGTERM") == 2, err[-4000:]
  steps = sorted(int(s) for s in os.listdir(d / "checkpoints") if s.isdigit())
  assert 20 <= steps[-1] < 60, steps
  p = _launch(2, 4, f"--workdir={d}", *TRAIN)            # the rerun resumes and finishes
  assert f"at step {steps[-1]}" in p.stderr
  x = _sample(d, tmp_path / "s.npz", lambda *a: _launch(2, 4, *a))
  np.testing.assert_array_equal(x, x_ref)


def test_a_dead_process_ends_the_others_within_bounded_time(tmp_path):
  """SIGKILL of one process (a lost host): the survivor must not hang in its next collective. Started without
  local.py (which would stop the survivor itself) to see what the trainer does on its own."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import local
  port = local.free_port()
  procs = []
  for i in range(2):
    env = local.child_env(dict(os.environ), i, 2, 4, port)
    env["DMD_JAX_HEARTBEAT_TIMEOUT_S"] = "10"
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dmd_jax.main", "--config=" + os.path.join(ROOT, "configs", "toy2d.py"),
         f"--workdir={tmp_path / 'run'}", *FAST, "--config.num_train_steps=100000", "--config.log_every=20"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  try:
    t0 = time.time()
    while "step 20/" not in (line := procs[0].stderr.readline()):
      assert line or procs[0].poll() is None, "process 0 ended before training"
      assert time.time() - t0 < 300
    procs[1].kill()
    t_kill = time.time()
    rest = procs[0].stderr.read()                       # drained until the survivor exits
    procs[0].wait(timeout=200)
    elapsed = time.time() - t_kill
    print(f"survivor exited with {procs[0].returncode} {elapsed:.1f} s after its peer was killed")
    assert procs[0].returncode != 0 and elapsed < 60, rest[-3000:]
    assert "unhealthy" in rest or "Gloo" in rest or "heartbeat" in rest.lower(), rest[-3000:]   # says why
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
