"""Multi-process training as a pod runs it, on this machine: ``launch/local.py`` starts N real processes
(``jax.distributed`` with an explicit coordinator on 127.0.0.1, process count and id; gloo CPU collectives),
each with K emulated CPU devices.

* toy: 2 processes × 4 devices train, get SIGTERM after a checkpoint (one consistent checkpoint, exit code 42),
  rerun and finish; their final state equals 1 process × 8 devices with ``jax.distributed`` initialised bit
  for bit (the same programs; so the resume is exact too) and a plain 1 × 8 run within float tolerance
  (another summation order); the regression set is the same; the checkpoint is read by 1 and by 4
  processes (same samples); the evaluation across 2 processes equals the 1-process one.
* ``imagenet64:tiny`` (pairs, LPIPS) 2 × 4 equals 1 × 8 exactly; ``coco:tiny`` ``--mode=eval`` (FID, CLIP
  score) across 2 processes equals 1 process exactly.
* failures: a SIGKILLed process, a stopped one (SIGSTOP: alive but stuck; the others time out in their
  collective), a second SIGTERM while stuck in a collective (exits at once), a coordination service that does
  not answer.

Every run shares the session's persistent compilation cache (``helpers.CACHE_ENV``): a program compiled by
one run (the toy train step, the pair sampler) is loaded by the next one with the same devices, which
changes nothing in what the programs compute. Every multi-process run has a hard timeout."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import FAST, NO_EVALS_TOY, ROOT, TOY, env_with_devices, main_cmd, read_pairs

LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = FAST + ["--config.num_train_steps=60", "--config.checkpoint_every=20", "--config.log_every=20"]
IMAGENET_TINY = os.path.join(ROOT, "configs", "imagenet64.py:tiny")
COCO_TINY = os.path.join(ROOT, "configs", "coco.py:tiny")
LIMIT = 500          # seconds: local.py's --timeout for every run; the test's own timeout is a minute more


def _env(devices=None, fast_compile=False, **extra) -> dict:
  """A child's environment: CPU devices, the session's compilation cache (programs compiled for 1 s or more)."""
  env = env_with_devices(devices, fast_compile)   # with the session's compilation cache (helpers.CACHE_ENV)
  env.update(extra)
  return env


def _local_cmd(n, k, *args, config=TOY):
  return [sys.executable, LOCAL, f"--num_processes={n}", f"--devices_per_process={k}", f"--timeout={LIMIT}",
          "--", f"--config={config}", *args]


def _launch(n, k, *args, config=TOY, fast_compile=False, check=True):
  p = subprocess.run(_local_cmd(n, k, *args, config=config), cwd=ROOT, env=_env(None, fast_compile),
                     capture_output=True, text=True, timeout=LIMIT + 60)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDERR:\n{p.stderr[-6000:]}")
  return p


def _single(devices, *args, config=TOY, fast_compile=False):
  """One process without jax.distributed (a plain run)."""
  p = subprocess.run(main_cmd(*args, config=config), cwd=ROOT, env=_env(devices, fast_compile),
                     capture_output=True, text=True, timeout=LIMIT)
  if p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDERR:\n{p.stderr[-6000:]}")
  return p


def _sample(workdir, out, launcher):
  launcher(f"--workdir={workdir}", "--mode=sample", "--num_samples=256", f"--output={out}", "--seed=0", *FAST)
  return np.load(out)["samples"]


def _pairs(workdir):
  return read_pairs(workdir)


def _state(workdir, step) -> dict:
  """Every array of the train state in checkpoint ``step`` (generator, fake score, their optimizer states,
  the step), as NumPy, by path."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckpt = ocp.PyTreeCheckpointer()
  tree = ckpt.metadata(path).item_metadata.tree
  state = ckpt.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _assert_same_state(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  different = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not different, f"{len(different)} of {len(a)} arrays differ, e.g. {different[:5]}"


def _max_difference(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b)
  return max(float(np.abs(a[k].astype(np.float64) - b[k]).max(initial=0.0)) for k in a)


# ---------------------------------------------------------------------------------------------------------
# toy2d: 2 × 4 (SIGTERM, resume) against 1 × 8
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_two(tmp_path_factory):
  """2 processes × 4 devices: train; SIGTERM to local.py (which forwards it to every process) once the
  checkpoint of step 20 exists; rerun (resumes, finishes at step 60); --mode=sample over 2 processes."""
  d = tmp_path_factory.mktemp("two") / "run"
  log = d.parent / "preempted.log"
  t0 = time.time()
  with open(log, "w") as err:
    proc = subprocess.Popen(_local_cmd(2, 4, f"--workdir={d}", *TRAIN), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
      while not os.path.isdir(d / "checkpoints" / "20"):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() - t0 < 300, "no checkpoint of step 20 after 300 s"
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  stopped = max(int(s) for s in os.listdir(d / "checkpoints") if s.isdigit())
  resumed = _launch(2, 4, f"--workdir={d}", *TRAIN)
  x = _sample(d, d.parent / "s.npz", lambda *a: _launch(2, 4, *a))
  return dict(dir=d, code=code, preempted_log=log.read_text(), stopped=stopped, resumed=resumed.stderr,
              samples=x, seconds=time.time() - t0)


@pytest.fixture(scope="module")
def toy_one(tmp_path_factory):
  """1 process × 8 devices with jax.distributed initialised, uninterrupted."""
  d = tmp_path_factory.mktemp("one") / "run"
  _launch(1, 8, f"--workdir={d}", *TRAIN)
  return d


def test_sigterm_to_every_process_saves_one_checkpoint_exits_42_and_the_rerun_resumes(toy_two):
  err = toy_two["preempted_log"]
  assert toy_two["code"] == 42, err[-4000:]                      # distributed.PREEMPTED_EXIT_CODE
  assert err.count("forwarding SIGTERM") == 1
  assert err.count("every process saves and stops after step") == 2, err[-4000:]
  assert err.count("stopped by SIGTERM at step") == 2, err[-4000:]
  assert 20 < toy_two["stopped"] < 60, toy_two["stopped"]        # a checkpoint of its own, before the end
  resumed = toy_two["resumed"]
  assert f"at step {toy_two['stopped']}" in resumed and "process 1 of 2" in resumed and "over 8 devices" in resumed


def test_two_processes_resumed_equal_one_distributed_process_exactly_and_plain_one_closely(tmp_path, toy_two,
                                                                                          toy_one):
  two, one = _state(toy_two["dir"], 60), _state(toy_one, 60)
  _assert_same_state(two, one)           # the same programs: bit-identical, although 2 × 4 was stopped and resumed
  a, b = _pairs(toy_two["dir"]), _pairs(toy_one)   # the regression set built by 2 processes = by 1
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  plain = tmp_path / "plain"       # 1 × 8 without jax.distributed: another summation order (not evaluated)
  _single(8, f"--workdir={plain}", *TRAIN, *NO_EVALS_TOY)
  diff = _max_difference(_state(plain, 60), two)
  print(f"2 x 4 with a SIGTERM and a resume: {toy_two['seconds']:.0f} s; |plain 1x8 - 2x4| max {diff:.2e} "
        f"over every state array")
  assert diff <= 1e-4


def test_checkpoint_of_two_processes_restores_in_one_and_four(tmp_path, toy_two):
  d2, x2 = toy_two["dir"], toy_two["samples"]
  x_one = _sample(d2, tmp_path / "one.npz", lambda *a: _single(1, *a))
  np.testing.assert_allclose(x_one, x2, atol=1e-5, rtol=0)   # samples do not depend on the device count
  x_four = _sample(d2, tmp_path / "four.npz", lambda *a: _launch(4, 2, *a))
  np.testing.assert_allclose(x_four, x2, atol=1e-5, rtol=0)


def test_eval_across_two_processes_equals_one(toy_two, toy_one):
  """The evaluation at the end of training (the code of --mode=eval, which the COCO test below runs across
  processes) of the same generator: 2 processes (after the resume) and 1 process agree exactly."""
  two = json.load(open(toy_two["dir"] / "metrics.json"))
  one = json.load(open(toy_one / "metrics.json"))
  assert two["steps"] == one["steps"] == 60
  for who in ("generator", "teacher"):
    assert two[who] == one[who], (who, two[who], one[who])


# ---------------------------------------------------------------------------------------------------------
# The image configs (small: 2 steps; the evaluation only where it is what is tested)
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# Failures: a dead process, a stuck one, a second SIGTERM, a silent coordination service
# ---------------------------------------------------------------------------------------------------------

STUCK_TIMEOUT_S = 15   # DMD_JAX_COLLECTIVE_TIMEOUT_S of the failure tests (one value: one compilation for all)
# The failure tests' job: no checkpoint before the end, so that a process is stopped in a train step's
# collective, not inside an Orbax save (whose cross-process barrier has Orbax's own timeout: docs/multihost.md).
PAIR_TRAIN = FAST + ["--config.num_train_steps=60", "--config.checkpoint_every=1000", "--config.log_every=20"]


class _Pair:
  """Two processes of one toy job started without local.py (which would stop the survivor itself), each
  logging to a file, so that the test sees what the trainer does on its own."""

  def __init__(self, tmp_path, **env):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import local
    port = local.free_port()
    self.logs = [tmp_path / f"p{i}.log" for i in range(2)]
    self.procs = []
    for i in range(2):
      e = local.child_env(_env(), i, 2, 4, port)
      e.update(DMD_JAX_COLLECTIVE_TIMEOUT_S=str(STUCK_TIMEOUT_S), **env)
      with open(self.logs[i], "w") as f:
        self.procs.append(subprocess.Popen(main_cmd(f"--workdir={tmp_path / 'run'}", *PAIR_TRAIN), cwd=ROOT, env=e,
                                           stdout=subprocess.DEVNULL, stderr=f))

  def log(self, i) -> str:
    return self.logs[i].read_text()

  def wait_for_step(self, step, who=0, limit=300):
    t0 = time.time()
    while f"step {step}/" not in self.log(who):
      assert all(p.poll() is None for p in self.procs), f"a process ended early:\n{self.log(who)[-3000:]}"
      assert time.time() - t0 < limit, f"no step {step} after {limit} s"
      time.sleep(0.05)

  def wait(self, who, limit) -> tuple[int, float]:
    """Exit code of process ``who`` and the seconds it took from now."""
    t0 = time.time()
    try:
      code = self.procs[who].wait(timeout=limit)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process {who} still running after {limit} s:\n{self.log(who)[-3000:]}") from None
    return code, time.time() - t0

  def close(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()          # also ends a stopped process
      p.wait()


def test_a_dead_process_ends_the_others_within_bounded_time(tmp_path):
  """SIGKILL of one process (a lost host): the survivor must not hang in its next collective."""
  pair = _Pair(tmp_path, DMD_JAX_HEARTBEAT_TIMEOUT_S="10")
  try:
    pair.wait_for_step(20)
    pair.procs[1].kill()
    code, elapsed = pair.wait(0, 200)
    rest = pair.log(0)
    print(f"survivor exited with {code} {elapsed:.1f} s after its peer was killed")
    assert code != 0 and elapsed < 60, rest[-3000:]
    low = rest.lower()
    assert "unhealthy" in low or "gloo" in low or "heartbeat" in low, rest[-3000:]   # says why
  finally:
    pair.close()


def test_a_stuck_process_ends_the_others_by_the_collective_timeout(tmp_path):
  """SIGSTOP of process 1 (alive, its connections open, heartbeats stopped but far from their 300 s timeout):
  process 0 waits in a gloo collective until DMD_JAX_COLLECTIVE_TIMEOUT_S, then exits with code 1 and says
  why (instead of XLA:CPU's default of 30 minutes)."""
  pair = _Pair(tmp_path, DMD_JAX_HEARTBEAT_TIMEOUT_S="300")
  try:
    pair.wait_for_step(20)
    os.kill(pair.procs[1].pid, signal.SIGSTOP)
    code, elapsed = pair.wait(0, STUCK_TIMEOUT_S + 90)
    rest = pair.log(0)
    print(f"process 0 exited with {code} {elapsed:.1f} s after process 1 was stopped "
          f"(collective timeout {STUCK_TIMEOUT_S} s)")
    assert code == 1, rest[-3000:]
    assert "error: a collective across processes timed out" in rest, rest[-3000:]
    assert f"Timed out waiting {STUCK_TIMEOUT_S * 1000}ms" in rest, rest[-3000:]
    assert STUCK_TIMEOUT_S - 5 < elapsed < STUCK_TIMEOUT_S + 45
  finally:
    pair.close()


def test_a_second_sigterm_exits_at_once_while_stuck_in_a_collective(tmp_path):
  """Process 1 stopped, process 0 stuck in a collective: a first SIGTERM cannot be honoured (the checkpoint
  needs process 1), a second one ends process 0 at once with 143 — before the collective times out."""
  pair = _Pair(tmp_path, DMD_JAX_HEARTBEAT_TIMEOUT_S="300")
  try:
    pair.wait_for_step(20)
    os.kill(pair.procs[1].pid, signal.SIGSTOP)
    time.sleep(1.0)                             # process 0 is now waiting for process 1 in a collective
    pair.procs[0].send_signal(signal.SIGTERM)
    time.sleep(2.0)
    assert pair.procs[0].poll() is None, pair.log(0)[-3000:]    # stuck: the first SIGTERM is pending
    assert "SIGTERM received: saving a checkpoint" in pair.log(0)
    pair.procs[0].send_signal(signal.SIGTERM)
    code, elapsed = pair.wait(0, 10)
    print(f"process 0 exited with {code} {elapsed:.2f} s after its second SIGTERM")
    assert code == 143 and elapsed < 5, pair.log(0)[-3000:]
    assert "dmd_jax: SIGTERM while a SIGTERM is pending" in pair.log(0)
  finally:
    pair.close()


def test_a_silent_coordination_service_ends_the_preemption_poll(monkeypatch):
  """Preemption.should_stop asks the coordination service (on process 0) at every step; a stopped process 0
  never answers, and the call has no deadline of its own: it is abandoned after the timeout with a clear
  error (measured by hand with 2 real processes, SIGSTOP of process 0 and a 10 s timeout: process 1 exited
  20.1 s after the stop)."""
  import jax
  from jax._src import distributed as jax_distributed
  from dmd_jax import distributed, preemption

  release = threading.Event()

  class Silent:
    def key_value_try_get(self, key):
      release.wait()

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax_distributed.global_state, "client", Silent())
  monkeypatch.setattr(preemption, "install", lambda: None)   # keep this test process's signal handlers
  p = preemption.Preemption(4, timeout_s=0.5)
  t0 = time.time()
  try:
    with pytest.raises(distributed.PeerUnresponsive, match="did not answer a key-value read within 0.5 s"):
      p.should_stop(1)
    assert time.time() - t0 < 3
  finally:
    release.set()
    p.restore()


def test_the_collective_timeout_is_added_to_xla_flags_without_clobbering_them():
  from dmd_jax import distributed
  env = {"JAX_PLATFORMS": "cpu"}
  assert distributed.add_collective_timeout(env) == 300
  assert env["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=300"
  gpu = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}   # a CPU flag is never handed to them
  assert "default" in str(distributed.add_collective_timeout(gpu)) and gpu["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "DMD_JAX_COLLECTIVE_TIMEOUT_S": "12"}
  assert distributed.add_collective_timeout(env) == 12 and distributed.collective_timeout_s(env) == 12
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_cpu_collective_timeout_seconds=12"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_collective_timeout_seconds=7 --xla_dump_to=/tmp/x",
         "DMD_JAX_COLLECTIVE_TIMEOUT_S": "12"}   # the user's own flag wins
  assert distributed.add_collective_timeout(env) == "7" and distributed.collective_timeout_s(env) == 7.0
  assert env["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=7 --xla_dump_to=/tmp/x"
  for bad in ("x", "0", "-3"):
    with pytest.raises(ValueError, match="DMD_JAX_COLLECTIVE_TIMEOUT_S"):
      distributed.add_collective_timeout({"JAX_PLATFORMS": "cpu", "DMD_JAX_COLLECTIVE_TIMEOUT_S": bad})


# A process started as dmd_jax.main starts one: preemption.install(), then train.start_process initialises
# jax.distributed (1 process: JAX's preemption notifier replaces the SIGTERM handler) and installs the stop-signal
# handling again; then waiting, with a training loop's Preemption or without.
SIGNALS = """
import signal, sys, time, types
# SIGINT as in a terminal: the suite may run as a background job, whose children inherit SIGINT ignored
# (POSIX shells do that to asynchronous commands), and a process keeps an inherited ignored SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
from dmd_jax import preemption, train
preemption.install()
train.start_process(types.SimpleNamespace(distributed="yes"), sys.argv[2])
if sys.argv[1] == "loop":
  preemption.Preemption(4)
print("ready", flush=True)
try:
  time.sleep(60)
except KeyboardInterrupt:   # (dmd_jax.main would exit with 130 here: only the watcher's exit is tested)
  time.sleep(60)
"""


@pytest.mark.parametrize("where", ["outside", "loop"])
def test_sigterm_outside_the_training_loop_exits_at_once_and_a_second_signal_always_does(where, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import local
  env = local.child_env(_env(), 0, 1, 1, local.free_port())
  proc = subprocess.Popen([sys.executable, "-c", SIGNALS, where, str(tmp_path / "w")], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    seen = ""
    if where == "loop":      # the loop would save a checkpoint at its next step; the process goes on
      # SIGINT only once the SIGTERM was handled: two pending signals are handled SIGINT first (lower number)
      deadline = time.time() + 60
      while "SIGTERM received" not in seen:
        assert time.time() < deadline and proc.poll() is None, seen[-3000:]
        if select.select([proc.stderr], [], [], 1.0)[0]:
          seen += proc.stderr.readline()
      assert proc.poll() is None
      proc.send_signal(signal.SIGINT)
    t0 = time.time()
    code = proc.wait(timeout=10)
    err = seen + proc.stderr.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert time.time() - t0 < 3
  if where == "outside":     # had train.start_process not installed it again, SIGTERM would do nothing here
    assert code == 143 and "SIGTERM outside the training loop" in err, (code, err[-3000:])
  else:
    assert code == 130 and "SIGINT while a SIGTERM is pending" in err, (code, err[-3000:])
    assert "SIGTERM received: saving a checkpoint" in err
