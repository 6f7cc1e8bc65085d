"""Faults around the files a run writes, on the toy through the CLI (docs/reliability.md).

* A damaged newest checkpoint (its largest file truncated, its JSON item deleted, a bit flipped in an array
  chunk that Orbax restores without an error): the rerun resumes from the older checkpoint, moves the damaged
  one to ``checkpoints_damaged/`` and ends bit for bit where an uninterrupted run ends. The same with two
  processes where only one of them fails to read the checkpoint: both skip it.
* A full disk (a file-size limit, ``RLIMIT_FSIZE``, set inside the run with SIGXFSZ ignored, so a write fails
  with EFBIG as it would with ENOSPC) during a checkpoint save and during a regression-pair shard: the run stops
  with an error naming the folder or file, the earlier files are intact, and the rerun ends where an
  uninterrupted run ends.
* The checkpointer itself (in this process, a small state): no intact checkpoint is an error naming every step
  and nothing is moved; a checkpoint of other arrays than the config's is a config error, not damage; checkpoints
  written before the integrity record still restore.

Every run here uses a constant learning rate, so a run to step 20 continued to 40 is the run to 40.
"""
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from dmd_jax import checkpoint
from helpers import FAST, NO_EVALS_TOY, ROOT, env_with_devices, read_pairs, run_main

ARGS = FAST + NO_EVALS_TOY + ["--config.optim.decay=constant", "--config.checkpoint_every=10"]
HALF, FULL = 20, 40     # the damaged runs stop at HALF (checkpoints 10 and 20); every rerun goes on to FULL


def _train(workdir, steps, **kw):
  return run_main(f"--workdir={workdir}", *ARGS, f"--config.num_train_steps={steps}", **kw)


def _state(workdir, step) -> dict:
  """The checkpoint's train state as ``{array name: numpy array}``, read by Orbax alone (nothing verified)."""
  st = ocp.StandardCheckpointHandler().restore(epath.Path(workdir) / "checkpoints" / str(step) / "state",
                                               args=ocp.args.StandardRestore())
  return {k: np.asarray(v) for k, v in checkpoint._named_arrays(st).items()}


def _assert_same_state(workdir, reference, step=FULL):
  a, b = _state(workdir, step), _state(reference, step)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _files(folder) -> list[str]:
  return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run to FULL."""
  d = tmp_path_factory.mktemp("reference") / "run"
  _train(d, FULL)
  return d


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
  """A run to HALF: checkpoints 10 and 20."""
  d = tmp_path_factory.mktemp("half") / "run"
  _train(d, HALF)
  assert _steps(d) == [10, 20]
  return d


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ---------------------------------------------------------------------------------------------------------

def _truncate_largest(step_dir) -> str:
  big = max(_files(step_dir), key=os.path.getsize)
  os.truncate(big, os.path.getsize(big) // 2)
  return "truncated " + os.path.relpath(big, step_dir)


def _delete_meta(step_dir) -> str:
  os.remove(os.path.join(step_dir, "meta", "metadata"))
  return "deleted meta/metadata"


def _flip_silently(step_dir) -> str:
  """Flips one bit in an array chunk of the OCDBT data files where Orbax then restores without an error but
  with other numbers (what this test shows the checksums are for): the first such position from the middle of
  the largest data file on."""
  ref = {k: np.asarray(v) for k, v in checkpoint._named_arrays(_plain_restore(step_dir)).items()}
  data = max((f for f in _files(step_dir) if "/ocdbt.process_0/d/" in f), key=os.path.getsize)
  size = os.path.getsize(data)
  for pos in range(size // 2, size - 8, 97):
    _flip(data, pos)
    try:
      got = checkpoint._named_arrays(_plain_restore(step_dir))
    except Exception:   # noqa: BLE001  (this position breaks the chunk's encoding: Orbax would notice)
      got = None
    changed = [k for k in ref if got is not None and not np.array_equal(np.asarray(got[k]), ref[k], equal_nan=True)]
    if changed:
      return f"flipped a bit at byte {pos} of {os.path.relpath(data, step_dir)}: Orbax restores {changed} silently"
    _flip(data, pos)   # back
  raise AssertionError(f"no position in {data} changes a value silently")


def _plain_restore(step_dir):
  return ocp.StandardCheckpointHandler().restore(epath.Path(step_dir) / "state", args=ocp.args.StandardRestore())


def _flip(path, pos):
  with open(path, "r+b") as f:
    f.seek(pos)
    b = f.read(1)[0]
    f.seek(pos)
    f.write(bytes([b ^ 0x10]))


DAMAGE = {"truncate": _truncate_largest, "delete": _delete_meta, "flip": _flip_silently}
DETECTED_BY = {"truncate": "OUT_OF_RANGE: Error reading", "delete": "FileNotFoundError",
               "flip": "differ from their checksums"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, damage, half_run, reference):
  d = tmp_path / "run"
  shutil.copytree(half_run, d)
  step_dir = d / "checkpoints" / str(HALF)
  what = DAMAGE[damage](step_dir)
  damaged_files = {os.path.relpath(f, step_dir): os.path.getsize(f) for f in _files(step_dir)}
  p = _train(d, FULL)
  log = p.stderr
  assert f"resumed from {d}/checkpoints at step 10" in log, (what, log[-3000:])
  warning = re.search(rf"DAMAGED CHECKPOINT: checkpoint {HALF} in \S+ cannot be restored \((.*)\); trying", log)
  assert warning and DETECTED_BY[damage] in warning[1], (what, log[-3000:])
  moved = d / "checkpoints_damaged" / f"{HALF}-0"
  assert f"moved checkpoint {HALF} from {step_dir} to {moved}" in log
  assert {os.path.relpath(f, moved): os.path.getsize(f) for f in _files(moved)} == damaged_files   # kept as it was
  assert _steps(d) == [20, 30, 40]
  _assert_same_state(d, reference)


@pytest.mark.slow
def test_two_processes_agree_to_skip_a_checkpoint_only_one_cannot_read(tmp_path, half_run):
  """Process 1 of 2 fails to read checkpoint 20's arrays (an OSError injected through sitecustomize, which only
  this test puts on the path); process 0 reads them fine. Both must skip it, and resume from 10 together."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      "import os\n"
      "if os.environ.get('DMD_JAX_PROCESS_ID') == '1':\n"
      "  import orbax.checkpoint as ocp\n"
      "  _restore = ocp.StandardCheckpointHandler.restore\n"
      "  def restore(self, directory, *a, **k):\n"
      f"    if os.fspath(directory).rstrip('/').endswith('/{HALF}/state'):\n"
      "      raise OSError(f'injected read error in {directory}')\n"
      "    return _restore(self, directory, *a, **k)\n"
      "  ocp.StandardCheckpointHandler.restore = restore\n")
  d = tmp_path / "run"
  shutil.copytree(half_run, d)
  env = env_with_devices(None)
  env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2", "--devices_per_process=1",
         "--timeout=240", "--", f"--config={os.path.join(ROOT, 'configs', 'toy2d.py')}", f"--workdir={d}", *ARGS,
         "--config.num_train_steps=30"]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-5000:]
  assert "[p1] " in p.stderr and "injected read error" in p.stderr
  assert "reading its state failed on process(es) [1]" in p.stderr       # process 0's verdict
  for i in (0, 1):
    assert re.search(rf"\[p{i}\] .*resumed from {d}/checkpoints at step 10", p.stderr), p.stderr[-3000:]
  assert os.listdir(d / "checkpoints_damaged") == [f"{HALF}-0"]
  assert _steps(d) == [10, 20, 30]


# ---------------------------------------------------------------------------------------------------------
# A full disk.
# ---------------------------------------------------------------------------------------------------------

def _limited(patch: str) -> str:
  """The entry point with ``patch`` applied first (test-only code: it sets the file-size limit at one write)."""
  return ("import resource, signal\n"
          "def limit(n):\n"
          "  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write then fails with EFBIG instead\n"
          "  resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))\n"
          + patch + "from dmd_jax import main\nmain.run()\n")


SAVE_20_LIMITED = _limited(f"""
from dmd_jax import checkpoint
_save = checkpoint.Checkpointer.save
def save(self, step, state, meta):
  if step == {HALF}:
    self.wait()        # checkpoint 10 is complete: only the save of {HALF} meets the limit
    limit(20_000)      # below the state's largest file (~45 kB), above the event file's size
  return _save(self, step, state, meta)
checkpoint.Checkpointer.save = save
""")


PAIR_SHARD_LIMITED = _limited("""
from dmd_jax import io
_write = io.write_npy
def write_npy(path, array):
  if str(path).endswith('shard-00002.x.npy'):
    limit(1000)        # below a 128-pair file (1152 bytes): shard 2's z is written, its x is not
  return _write(path, array)
io.write_npy = write_npy
""")


@pytest.mark.slow
def test_full_disk_during_a_pair_shard_then_during_a_checkpoint_save(tmp_path, reference):
  """The disk fills up while shard 2 of the regression pairs is written; after room is made, it fills up again
  while checkpoint 20 is saved; the third run has room. (One workdir for both faults: three runs, not four.)"""
  d = tmp_path / "run"
  # 1. a pair shard: the run stops naming the file; shards 0 and 1 are complete, 2 is partial (no index), 3 absent
  p = _train(d, FULL, script=PAIR_SHARD_LIMITED, check=False)
  assert p.returncode == 1, p.stderr[-3000:]
  assert f"writing shard 2 of the regression pairs failed at {d}/pairs/shard-00002.x.npy (File too large)" \
      in p.stderr, p.stderr[-3000:]
  names = sorted(os.listdir(d / "pairs"))
  assert "shard-00002.z.npy" in names and "shard-00002.index.npy" not in names, names
  assert "shard-00001.index.npy" in names and not [n for n in names if n.startswith(("shard-00003", ".tmp"))], names
  assert not os.path.exists(d / "checkpoints") or not _steps(d)
  # 2. checkpoint 20: the run rebuilds shards 2 and 3, trains, and stops naming the checkpoint's folder
  p = _train(d, FULL, script=SAVE_20_LIMITED, check=False)
  assert "building 2 regression-pair shards" in p.stderr, p.stderr[-3000:]
  assert p.returncode == 1, p.stderr[-3000:]
  assert f"CheckpointSaveError: saving checkpoint {HALF} to {d}/checkpoints/{HALF} failed" in p.stderr, \
      p.stderr[-3000:]
  assert "File too large" in p.stderr and "The earlier checkpoints" in p.stderr
  assert _steps(d) == [10] and not os.path.exists(d / "metrics.json")
  # 3. room again: resumes from 10 (restored and verified), ends where the uninterrupted run ends
  p = _train(d, FULL)
  assert f"resumed from {d}/checkpoints at step 10" in p.stderr and "DAMAGED" not in p.stderr
  assert "building" not in p.stderr
  assert _steps(d) == [20, 30, 40]
  ours, theirs = read_pairs(d), read_pairs(reference)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  _assert_same_state(d, reference)


# ---------------------------------------------------------------------------------------------------------
# The checkpointer in this process.
# ---------------------------------------------------------------------------------------------------------

def _small_state(scale=1.0):
  rs = np.random.RandomState(0)
  return {"w": jnp.asarray(rs.randn(64, 64).astype(np.float32) * scale), "b": jnp.asarray(rs.randn(64), jnp.bfloat16),
          "step": jnp.asarray(3, jnp.int32), "ok": jnp.asarray([True, False])}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _saved(tmp_path, steps=(1, 2)):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for s in steps:
    ckpt.save(s, _small_state(s), {"step": s})
  ckpt.wait()
  return ckpt


def test_checksums_catch_any_single_bit():
  state = _small_state()
  base = checkpoint.checksums(state)
  assert set(base) == {"w", "b", "step", "ok"} and base["w"][:2] == ["float32", [64, 64]]
  for name, flip in (("w", lambda x: x.at[5, 7].set(jax.lax.bitcast_convert_type(
                        jax.lax.bitcast_convert_type(x[5, 7], jnp.uint32) ^ jnp.uint32(1 << 31), jnp.float32))),
                     ("b", lambda x: x.at[3].set(jax.lax.bitcast_convert_type(
                        jax.lax.bitcast_convert_type(x[3], jnp.uint16) ^ jnp.uint16(1), jnp.bfloat16))),
                     ("ok", lambda x: x.at[1].set(True))):
    changed = checkpoint.checksums({**state, name: flip(state[name])})
    assert changed[name] != base[name] and all(changed[k] == base[k] for k in base if k != name)


def test_restore_verifies_and_keeps_the_meta_clean(tmp_path):
  ckpt = _saved(tmp_path)
  state, meta = ckpt.restore(2, _abstract(_small_state()))
  assert meta == {"step": 2}
  np.testing.assert_array_equal(state["w"], _small_state(2)["w"])
  restored = ckpt.restore_newest_intact(_abstract(_small_state()))
  assert restored.step == 2 and not restored.damaged and restored.meta == {"step": 2}
  _flip_silently(tmp_path / "checkpoints" / "2")    # what --mode=sample / eval / export then meet
  with pytest.raises(checkpoint.CheckpointDamaged, match=r"checkpoint 2 in .* is damaged: 1 of 4 arrays differ "
                                                         r"from their checksums recorded at save time \(w\)"):
    ckpt.restore(2, _abstract(_small_state()))


def test_no_intact_checkpoint_is_an_error_naming_every_step(tmp_path):
  ckpt = _saved(tmp_path)
  d = tmp_path / "checkpoints"
  os.remove(d / "1" / "meta" / "metadata")
  meta = d / "2" / "meta" / "metadata"
  meta.write_text(meta.read_text().replace('"step": 2', '"step": 7'))   # valid JSON, other content
  with pytest.raises(checkpoint.CheckpointDamaged) as e:
    ckpt.restore_newest_intact(_abstract(_small_state()))
  msg = str(e.value)
  assert "step 2: CheckpointDamaged" in msg and "(CRC-32)" in msg and "step 1: FileNotFoundError" in msg
  assert "Nothing was moved" in msg
  assert sorted(os.listdir(d)) == ["1", "2"] and not os.path.exists(tmp_path / "checkpoints_damaged")


def test_other_arrays_than_the_config_are_a_config_error_not_damage(tmp_path):
  ckpt = _saved(tmp_path)
  other = {**_abstract(_small_state()), "w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  with pytest.raises(ValueError, match=r"other arrays than this config builds .*w: checkpoint float32\[64, 64\], "
                                       r"config float32\[64, 32\]"):
    ckpt.restore_newest_intact(other)
  calls = []

  def other_stage(step, meta):
    calls.append((step, meta))
    raise ValueError("written without the GAN head")
  with pytest.raises(ValueError, match="without the GAN head"):
    ckpt.restore_newest_intact(_abstract(_small_state()), check=other_stage)
  assert calls == [(2, {"step": 2})] and sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not os.path.exists(tmp_path / "checkpoints_damaged")


def test_checkpoints_without_a_record_still_restore(tmp_path):
  """Checkpoints written before the integrity record: restored unverified; their structure comes from Orbax's
  metadata; NaN in them counts as damage."""
  mngr = ocp.CheckpointManager(epath.Path(tmp_path) / "checkpoints")
  for s, scale in ((1, 1.0), (2, float("nan"))):
    mngr.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(_small_state(scale)),
                                         meta=ocp.args.JsonSave({"step": s})))
  mngr.wait_until_finished()
  mngr.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state, meta = ckpt.restore(2, _abstract(_small_state()))
  assert meta == {"step": 2} and np.isnan(np.asarray(state["w"])).all()
  restored = ckpt.restore_newest_intact(_abstract(_small_state()))
  assert restored.step == 1 and restored.damaged[0][:2] == (2, "non-finite values in w")
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["2-0"] and ckpt.all_steps() == [1]


def test_damaged_checkpoint_in_a_bucket(tmp_path):
  """On ``gs://`` (the local Cloud Storage emulator; a subprocess gets its environment before any client loads):
  save two checkpoints of a small state, change the newer one's JSON item, and the newest intact one restores;
  the damaged one is moved aside, which a bucket (no folder renames) does object by object, commit marker first."""
  from gcs_emulator import Emulator
  code = """
import jax.numpy as jnp, numpy as np
from dmd_jax import checkpoint, io
state = lambda s: {'w': jnp.full((32, 32), float(s)), 'step': jnp.asarray(s, jnp.int32)}
ckpt = checkpoint.Checkpointer('gs://bucket/run')
for s in (1, 2):
  ckpt.save(s, state(s), {'step': s})
ckpt.wait()
meta = 'gs://bucket/run/checkpoints/2/meta/metadata'
io.write_bytes(meta, io.read_bytes(meta).replace(b'"step": 2', b'"step": 3'))
before = sorted(str(p) for p in io.path('gs://bucket/run/checkpoints/2').iterdir())
restored = ckpt.restore_newest_intact(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0)))
assert restored.step == 1 and float(restored.state['w'][0, 0]) == 1.0, restored
assert restored.damaged[0][0] == 2 and 'CRC-32' in restored.damaged[0][1], restored.damaged
assert restored.damaged[0][2] == 'gs://bucket/run/checkpoints_damaged/2-0', restored.damaged
assert ckpt.all_steps() == [1] and not io.exists('gs://bucket/run/checkpoints/2/commit_success.txt')
moved = 'gs://bucket/run/checkpoints_damaged/2-0'
for name in ('commit_success.txt', 'meta/metadata', 'state/manifest.ocdbt', 'state/_METADATA'):
  assert io.exists(io.join(moved, name)), name
print('moved')
""".replace("import jax.numpy", "import jax, jax.numpy")
  with Emulator("bucket") as gcs:
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env_with_devices(None), **gcs.env},
                       capture_output=True, text=True, timeout=120)
  assert p.returncode == 0 and "moved" in p.stdout, p.stderr[-3000:]
