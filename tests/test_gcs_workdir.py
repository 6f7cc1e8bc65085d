"""``gs://`` workdirs against a local Cloud Storage emulator (tests/gcs_emulator.py): the emulator's
extensions, dmd_jax.io on gs://, then the CLI end to end — train, SIGKILL while a checkpoint is half-written,
rerun (resumes from the bucket's last committed checkpoint), sample (to the bucket and to a local file),
eval — with every byte through the real clients (gcsfs via etils.epath, Orbax with TensorStore,
google-cloud-storage) — and the same training by 2 processes sharing the bucket. The resumed generator and
the 2-process run's state must be bit for bit those of an uninterrupted local run (every CLI run has
``jax.distributed`` initialised through launch/local.py, 1 × 8 or 2 × 4 devices: the same programs).
Clients run in subprocesses that get the emulator's environment before any of them is imported
(docs/gcs.md)."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO

import numpy as np
import pytest

from gcs_emulator import Emulator
from helpers import FAST, ROOT, TOY, env_with_devices, main_cmd, read_shards

TESTS = os.path.dirname(os.path.abspath(__file__))
LOCAL = os.path.join(ROOT, "launch", "local.py")
sys.path.insert(0, os.path.join(ROOT, "launch"))
import local  # noqa: E402  (launch/local.py: child_env, free_port)

ARGS = FAST + ["--config.num_train_steps=80", "--config.checkpoint_every=20"]   # 4 saves; 3 are kept
RUN = "gs://bucket/run"
SAMPLE = ["--mode=sample", "--num_samples=256", "--seed=0"]
# The runs share the session's persistent compilation cache: the train step compiled by the local run is
# loaded by the gs:// runs with the same devices (what the programs compute does not change).


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  with Emulator("bucket") as emulator:
    emulator.cache = str(tmp_path_factory.mktemp("local_copies"))   # io.local_copy's folder, per test session
    yield emulator


def _env(gcs):
  return {**env_with_devices(None), **gcs.env, "DMD_JAX_LOCAL_CACHE": gcs.cache}


# ---------------------------------------------------------------------------------------------------------
# The emulator's extensions (what TensorStore and gcsfs rely on)
# ---------------------------------------------------------------------------------------------------------

def _http(gcs, method, path, data=None, **query):
  """``(status, headers, body)`` of one JSON API request to the emulator."""
  url = f"{gcs.url}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
  req = urllib.request.Request(url, data=data, method=method)
  try:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
      return r.status, r.headers, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def test_emulator_preconditions_generations_and_move(gcs):
  up = lambda name, data, **q: _http(gcs, "POST", "/upload/storage/v1/b/bucket/o", data, uploadType="media",
                                     name=name, **q)
  obj = lambda name: f"/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe='')}"
  status, _, body = up("ext/a", b"one", ifGenerationMatch=0)
  gen = json.loads(body)["generation"]
  assert status == 200 and up("ext/a", b"two", ifGenerationMatch=0)[0] == 412          # create-only
  assert up("ext/a", b"two", ifGenerationMatch=int(gen) + 1)[0] == 412                  # stale generation
  status, headers, body = _http(gcs, "GET", obj("ext/a"), alt="media")
  assert (status, body, headers["x-goog-generation"]) == (200, b"one", gen)
  assert _http(gcs, "GET", obj("ext/a"), alt="media", ifGenerationNotMatch=gen)[0] == 304
  assert _http(gcs, "GET", obj("ext/a"), ifGenerationMatch=int(gen) + 1)[0] == 412
  status, _, body = up("ext/a", b"two", ifGenerationMatch=gen)                          # conditional overwrite
  gen2 = json.loads(body)["generation"]
  assert status == 200 and int(gen2) > int(gen)
  assert _http(gcs, "DELETE", obj("ext/a"), ifGenerationMatch=gen)[0] == 412
  up("ext/b", b"three")
  assert _http(gcs, "POST", obj("ext/b") + "/moveTo/o/ext%2Fa", ifGenerationMatch=0)[0] == 412
  status, _, body = _http(gcs, "POST", obj("ext/b") + "/moveTo/o/ext%2Fa", ifGenerationMatch=gen2)
  assert status == 200 and json.loads(body)["name"] == "ext/a" and gcs.list("ext/") == ["ext/a"]
  assert gcs.read("ext/a") == b"three"
  assert _http(gcs, "POST", obj("ext/b") + "/moveTo/o/ext%2Fc")[0] == 404
  _http(gcs, "DELETE", obj("ext/a"))
  assert gcs.list("ext/") == []


# ---------------------------------------------------------------------------------------------------------
# dmd_jax.io on gs://
# ---------------------------------------------------------------------------------------------------------

def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _io_checks(d: str) -> None:
  """dmd_jax.io in folder ``d`` of the emulator's bucket; run by test_io_on_gs in a subprocess."""
  from dmd_jax import io, writers
  j = lambda *parts: io.join(d, *parts)

  obj = {"b": [1, 2.5, None], "a": "ü"}
  io.write_json(j("a", "o.json"), obj)
  assert io.read_json(j("a", "o.json")) == obj
  io.write_text(j("t.txt"), "héllo\r\nwörld\n")
  assert io.read_bytes(j("t.txt")) == "héllo\r\nwörld\n".encode() and io.read_text(j("t.txt")) == "héllo\nwörld\n"
  arrays = {"p": np.arange(5, dtype=np.int16), "x/y": np.eye(3), "u": np.array(b"hi")}
  io.write_npz(j("a.npz"), **arrays)
  back = io.load_npz(j("a.npz"))
  assert sorted(back) == sorted(arrays) and all(np.array_equal(back[k], v) for k, v in arrays.items())
  io.write_npy(j("a.npy"), np.arange(6.0).reshape(2, 3))
  assert np.array_equal(io.load_npy(j("a.npy"), mmap=True), np.arange(6.0).reshape(2, 3))

  assert io.listdir(d) == ["a", "a.npy", "a.npz", "t.txt"]
  assert io.isdir(j("a")) and not io.isdir(j("t.txt")) and io.exists(j("t.txt")) and not io.exists(j("no"))
  for missing in (lambda: io.read_bytes(j("no")), lambda: io.listdir(j("no")),
                  lambda: io.remove(j("no"), missing_ok=False)):
    try:
      missing()
      raise AssertionError("no FileNotFoundError")
    except FileNotFoundError:
      pass
  io.remove(j("no"))

  try:                                            # an exception: the old object stays, no temporary
    with io.atomic_write(j("a.npz")) as f:
      f.write(b"half")
      raise RuntimeError("boom")
  except RuntimeError:
    pass
  assert np.array_equal(io.load_npz(j("a.npz"))["p"], arrays["p"])
  assert not [n for n in io.listdir(d) if ".tmp-" in n]

  # another process's writes are seen at once: listings, a rewritten file's new size, a removal
  other = lambda code: subprocess.run([sys.executable, "-c", f"from dmd_jax import io\n{code}"], check=True,
                                      env=os.environ)
  assert io.listdir(j("a")) == ["o.json"]
  other(f"io.write_text({j('a', 'n.txt')!r}, 'new'); io.write_text({j('t.txt')!r}, 'a longer text than before')"
        f"; io.remove({j('a', 'o.json')!r})")
  assert io.listdir(j("a")) == ["n.txt"] and not io.exists(j("a", "o.json"))
  assert io.read_text(j("t.txt")) == "a longer text than before"

  # stale temporaries: only this index's, of dead pids, and on gs:// only once old enough
  dead, me = _dead_pid(), os.getpid()
  names = {f".tmp-p0-{dead}-0a1b2c3d-x.json": "removed", f".tmp-p0-{me}-0a1b2c3d-x.json": "kept",
           f".tmp-p1-{dead}-0a1b2c3d-x.json": "kept", "x.json": "kept"}
  for n in names:
    io.path(j("tmps", n)).write_bytes(b"x")
  assert io.remove_stale_temporaries(j("tmps")) == []        # young: may be another machine's writer
  io._REMOTE_STALE_SECONDS = -1.0
  assert io.remove_stale_temporaries(j("tmps")) == [n for n, v in names.items() if v == "removed"]
  assert io.listdir(j("tmps")) == sorted(n for n, v in names.items() if v == "kept")
  assert io.remove_stale_temporaries(j("missing")) == []

  # local copies of remote files: downloaded again when the file was rewritten under the same name
  local = io.local_copy(j("a.npy"))
  assert not io.is_remote(local) and np.array_equal(np.load(local), np.arange(6.0).reshape(2, 3))
  ino = os.stat(local).st_ino
  assert io.local_copy(j("a.npy")) == local and os.stat(local).st_ino == ino          # reused
  time.sleep(1.1)                                                                     # mtimes are whole seconds
  io.write_npy(j("a.npy"), np.arange(6.0).reshape(2, 3) + 1)                           # same size, new content
  assert np.array_equal(np.load(io.local_copy(j("a.npy"))), np.arange(6.0).reshape(2, 3) + 1)
  # memory-mapped writes of remote files, kept as their local copy
  with io.open_memmap_for_write(j("emb.npy"), np.float16, (5, 3)) as arr:
    arr[:] = np.arange(15).reshape(5, 3)
    assert not io.exists(j("emb.npy"))
  assert np.array_equal(io.load_npy(j("emb.npy")), np.arange(15).reshape(5, 3))
  built = io.local_copy(j("emb.npy"))
  ino = os.stat(built).st_ino
  assert np.array_equal(io.load_npy(io.local_copy(j("emb.npy")), mmap=True), np.arange(15).reshape(5, 3))
  assert os.stat(built).st_ino == ino                                                 # not downloaded again

  # workdirs: a bucket root, a trailing slash, a missing bucket (a clear error)
  assert io.prepare_workdir("gs://bucket/") == "gs://bucket" and io.prepare_workdir(d + "/") == d
  try:
    io.prepare_workdir("gs://no-such-bucket/run")
    raise AssertionError("no error for a missing bucket")
  except ValueError as e:
    assert ("--workdir=gs://no-such-bucket/run is not a writable folder (bucket 'no-such-bucket' does not "
            "exist") in str(e), e

  # TensorBoard event files of a gs:// logdir (writers.RemoteEventFile): every record, in order
  w = writers.TensorboardXWriter(j("tb"))
  for step in range(5):
    w.write_scalars(step, {"loss": step * 0.5})
  w.flush()
  w.close()
  (events,) = io.listdir(j("tb"))
  assert [(s, v) for s, tag, v in _scalars(io.read_bytes(j("tb", events)))] == [(s, s * 0.5) for s in range(5)]
  assert not [n for n in io.listdir(d) if ".tmp-" in n or ".write-test" in n]


def _scalars(data: bytes) -> list[tuple[int, str, float]]:
  """The scalar summaries of a TensorBoard event file: (step, tag, value) in file order."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    i += 16 + n
  return out


def test_io_on_gs(gcs):
  code = "import test_gcs_workdir as t; t._io_checks('gs://bucket/io')"
  p = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=_env(gcs), capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------------
# The CLI: train, SIGKILL, resume, sample, eval; then 2 processes sharing the bucket
# ---------------------------------------------------------------------------------------------------------

def _launch(env, n, k, *args, workdir=RUN, cloud=True, timeout=300):
  """``launch/local.py``: n processes × k devices, jax.distributed initialised (also for n = 1, so that 1 × 8
  and 2 × 4 run the same programs and agree bit for bit); ``--allow_cloud`` passes the emulator's variables
  on. Returns ``(completed process, seconds)``."""
  t0 = time.time()
  cmd = [sys.executable, LOCAL, f"--num_processes={n}", f"--devices_per_process={k}", f"--timeout={timeout}",
         *(["--allow_cloud"] if cloud else []), "--", f"--config={TOY}", f"--workdir={workdir}", *ARGS, *args]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
  if p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-6000:]}")
  return p, time.time() - t0


def _steps(gcs, run="run") -> list[int]:
  """The committed checkpoint steps in the bucket (on gs://, Orbax marks a complete step with a file)."""
  return sorted(int(m[1]) for n in gcs.list(f"{run}/checkpoints/")
                if (m := re.fullmatch(rf"{run}/checkpoints/(\d+)/commit_success\.txt", n)))


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
  """An uninterrupted run of the same config on local disk (1 process × 8 devices): its folder, samples,
  final metrics and time."""
  d = tmp_path_factory.mktemp("local") / "run"
  env = env_with_devices(None)
  _, seconds = _launch(env, 1, 8, workdir=d, cloud=False)
  _launch(env, 1, 8, *SAMPLE, f"--output={d.parent / 's.npz'}", workdir=d, cloud=False)
  return d, np.load(d.parent / "s.npz")["samples"], json.load(open(d / "metrics.json")), seconds


def test_gs_workdir_kill_resume_sample_eval(gcs, local_reference, tmp_path, record_property):
  _, ref_samples, ref_metrics, ref_seconds = local_reference
  times = {"local train, uninterrupted": ref_seconds}

  # ---- train; SIGKILL while the arrays of the second checkpoint (step 40) are being written. The trainer is
  # started as local.py starts it (local.py itself would turn a SIGKILL into its children's SIGTERM) ----
  t0 = time.time()
  env = local.child_env(_env(gcs), 0, 1, 8, local.free_port(), allow_cloud=True)
  proc = subprocess.Popen(main_cmd(f"--workdir={RUN}", *ARGS), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    while not gcs.list("run/checkpoints/40/state/ocdbt.process_0/d/"):
      assert proc.poll() is None, f"run ended before its second checkpoint: {proc.stderr.read()[-3000:]}"
      assert time.time() - t0 < 240, "no second checkpoint in the bucket after 240 s"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.stderr.close()
  times["gs train until SIGKILL"] = time.time() - t0
  assert _steps(gcs) == [20], f"expected step 20 committed and 40 half-written, got {_steps(gcs)}"
  half_written = gcs.list("run/checkpoints/40/")
  assert half_written and "run/metrics.json" not in gcs.list("run/")

  # ---- rerun: resumes from the last committed step in the bucket, overwrites the half-written one ----
  p, times["gs train, resumed"] = _launch(_env(gcs), 1, 8)
  assert f"resumed from {RUN}/checkpoints at step 20" in p.stderr, p.stderr[-3000:]
  assert _steps(gcs) == [40, 60, 80] and not gcs.list("run/checkpoints/20/")   # the oldest one deleted

  # ---- sample to the bucket and to a local file; eval writes eval_step80.json to the bucket ----
  local_out = tmp_path / "s.npz"
  _, times["gs sample -> gs://"] = _launch(_env(gcs), 1, 8, *SAMPLE, "--output=gs://bucket/s.npz")
  _, times["gs sample -> local"] = _launch(_env(gcs), 1, 8, *SAMPLE, f"--output={local_out}")
  p, times["gs eval"] = _launch(_env(gcs), 1, 8, "--mode=eval")
  assert '"generator"' in p.stdout

  names = gcs.list("run/")
  for must in ("run/metrics.json", "run/eval_step80.json", "run/pairs/spec.json", "run/samples/toy_step80.png",
               *(f"run/pairs/shard-{i:05d}.{k}.npy" for i in range(4) for k in ("index", "z", "x", "cond")),
               *(f"run/checkpoints/{s}/{f}" for s in (40, 60, 80)
                 for f in ("commit_success.txt", "_CHECKPOINT_METADATA", "meta/metadata", "meta/commit_success.txt",
                           "state/manifest.ocdbt", "state/commit_success.txt"))):
    assert must in names, f"{must} missing from the bucket: {names}"
  assert "s.npz" in gcs.list("s.npz")
  # atomic writes leave nothing half-done; only the killed writer may have left a temporary
  assert not [n for n in names if ".write-test" in n or (".tmp-" in n and f"-{proc.pid}-" not in n)], names

  # ---- TensorBoard: the resumed run's scalars up to step 80 are in the bucket ----
  events = [n for n in names if re.fullmatch(r"run/events\.out\.tfevents\.[^/]*", n)]
  scalars = [s for n in events for s in _scalars(gcs.read(n))]
  assert (80, "steps_per_sec") in {(step, tag) for step, tag, _ in scalars}, scalars[-5:]

  # ---- the resumed run's generator is the uninterrupted local run's, bit for bit ----
  gs_samples = np.load(BytesIO(gcs.read("s.npz")))
  assert int(gs_samples["step"]) == 80
  np.testing.assert_array_equal(gs_samples["samples"], ref_samples)
  np.testing.assert_array_equal(np.load(local_out)["samples"], ref_samples)
  metrics, evaluated = json.loads(gcs.read("run/metrics.json")), json.loads(gcs.read("run/eval_step80.json"))
  assert metrics["steps"] == 80 and metrics["generator"] == ref_metrics["generator"]
  assert evaluated["generator"] == ref_metrics["generator"]

  for k, v in times.items():
    record_property(k, round(v, 1))
  print(f"\nkilled with {len(half_written)} objects of step 40 in the bucket; "
        f"{len(gcs.log)} requests to the emulator\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in times.items()))


def _state_difference(a: str, b: str) -> None:
  """Prints ``{"arrays": N, "different": [paths]}`` for the train states in checkpoint folders ``a`` and ``b``
  (local or gs://), read as NumPy; run by test_gs_workdir_two_processes in a subprocess."""
  import jax
  import orbax.checkpoint as ocp

  def state(path):
    ckpt = ocp.PyTreeCheckpointer()
    tree = ckpt.metadata(path).item_metadata.tree
    restored = ckpt.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(restored)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}

  x, y = state(a), state(b)
  assert sorted(x) == sorted(y)
  print(json.dumps({"arrays": len(x), "different": [k for k in x if not np.array_equal(x[k], y[k])]}))


def test_gs_workdir_two_processes_equal_one(gcs, local_reference, record_property):
  """The same training by 2 processes × 4 devices sharing the bucket (gs://bucket/run2): process 0 writes the
  pairs, metrics, events; both write their shards of every checkpoint and read the pairs from the bucket. Its
  final state, regression set and evaluation equal the 1-process local run's bit for bit."""
  ref_dir, _, ref_metrics, _ = local_reference
  p, seconds = _launch(_env(gcs), 2, 4, workdir="gs://bucket/run2")
  assert "process 1 of 2" in p.stderr
  assert _steps(gcs, "run2") == [40, 60, 80]
  names = gcs.list("run2/")
  for s in (40, 60, 80):
    for i in (0, 1):      # each process wrote its own OCDBT shards of the arrays
      assert any(n.startswith(f"run2/checkpoints/{s}/state/ocdbt.process_{i}/") for n in names), (s, i, names)
  assert not [n for n in names if ".tmp-" in n or ".write-test" in n], names
  metrics = json.loads(gcs.read("run2/metrics.json"))
  assert metrics["steps"] == 80
  for who in ("generator", "teacher"):
    assert metrics[who] == ref_metrics[who], (who, metrics[who], ref_metrics[who])
  ref_shards = read_shards(ref_dir / "pairs")
  assert len(ref_shards) == 4
  for shard, ref in ref_shards.items():
    for k in ref:
      np.testing.assert_array_equal(np.load(BytesIO(gcs.read(f"run2/pairs/{shard}.{k}.npy"))), ref[k])
  code = (f"import test_gcs_workdir as t; t._state_difference('gs://bucket/run2/checkpoints/80/state', "
          f"{str(ref_dir / 'checkpoints' / '80' / 'state')!r})")
  q = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=_env(gcs), capture_output=True, text=True,
                     timeout=300)
  assert q.returncode == 0, q.stderr[-4000:]
  diff = json.loads(q.stdout.strip().splitlines()[-1])
  assert diff["arrays"] > 30 and diff["different"] == [], diff
  record_property("gs train, 2 processes", round(seconds, 1))
  print(f"\n2 processes x 4 devices on gs://bucket/run2: {seconds:.1f} s; {diff['arrays']} state arrays "
        f"bit-identical to the 1-process local run's")
