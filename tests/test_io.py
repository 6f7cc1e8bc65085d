"""dmd_jax.io on local paths: atomic writes, stale temporaries, prepare_workdir, the remote event-file sink."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from dmd_jax import io
from dmd_jax import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temporaries(folder):
  return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_round_trips(tmp_path):
  d = tmp_path / "a" / "b"                                   # parents are created
  io.write_bytes(d / "x.bin", b"\x00\x01\xff")
  assert (d / "x.bin").read_bytes() == b"\x00\x01\xff" and io.read_bytes(d / "x.bin") == b"\x00\x01\xff"

  io.write_text(str(d / "t.txt"), "héllo\nwörld\n")
  assert (d / "t.txt").read_bytes() == "héllo\nwörld\n".encode("utf-8")
  (d / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
  assert io.read_text(d / "crlf.txt") == "a\nb\nc\n"         # universal newlines, as open() reads

  obj = {"b": [1, 2.5, None], "a": "ü"}
  io.write_json(d / "o.json", obj)
  assert io.read_json(d / "o.json") == obj
  assert (d / "o.json").read_text() == json.dumps(obj, indent=1)   # indent=1 by default
  io.write_json(d / "s.json", obj, indent=None, sort_keys=True)
  assert (d / "s.json").read_text() == '{"a": "\\u00fc", "b": [1, 2.5, null]}'

  arrays = {"p": np.arange(5, dtype=np.int16), "x/y": np.eye(3, dtype=np.float64), "u": np.array(b"hi")}
  io.write_npz(d / "a.npz", **arrays)                        # "p" and "/" in keys are fine
  back = io.load_npz(d / "a.npz")
  assert sorted(back) == sorted(arrays) and all(type(v) is np.ndarray for v in back.values())
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
  os.remove(d / "a.npz")                                     # load_npz closed the file

  a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  io.write_npy(d / "a.npy", a)
  full, mapped = io.load_npy(d / "a.npy"), io.load_npy(d / "a.npy", mmap=True)
  assert type(full) is np.ndarray and isinstance(mapped, np.memmap) and not mapped.flags.writeable
  assert np.array_equal(full, a) and np.array_equal(mapped, a) and mapped.dtype == np.float32
  assert _temporaries(d) == []


def test_atomic_write_names_and_replaces_only_at_the_end(tmp_path):
  dst = tmp_path / "f.bin"
  dst.write_bytes(b"old")
  with io.atomic_write(dst) as f:
    f.write(b"new data")
    f.flush()
    (tmp,) = _temporaries(tmp_path)
    assert tmp.startswith(f".tmp-p0-{os.getpid()}-") and tmp.endswith("-f.bin")
    assert (tmp_path / tmp).read_bytes() == b"new data" and dst.read_bytes() == b"old"   # not yet
  assert dst.read_bytes() == b"new data" and _temporaries(tmp_path) == []
  with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"):
    with io.atomic_write(dst, "ab"):
      pass


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_exception_leaves_the_old_file(tmp_path, mode):
  dst = tmp_path / "good.npz"
  io.write_npz(dst, x=np.arange(1000))
  before = dst.read_bytes()
  with pytest.raises(RuntimeError, match="boom"):
    with io.atomic_write(dst, mode) as f:
      f.write(b"half" * 1000 if mode == "wb" else "half" * 1000)
      raise RuntimeError("boom")
  assert dst.read_bytes() == before and _temporaries(tmp_path) == []
  with pytest.raises(KeyboardInterrupt):                      # also on BaseException
    with io.atomic_write(tmp_path / "new.txt", mode):
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ["good.npz"]                 # no new file, no temporary


def test_npz_writer_exception_keeps_previous_shard(tmp_path):
  dst = tmp_path / "shard.npz"
  io.write_npz(dst, x=np.ones(3))
  class Bad:
    def __array__(self, *args, **kwargs):
      raise TypeError("not an array")

  with pytest.raises(TypeError, match="not an array"):
    io.write_npz(dst, x=np.ones(3), bad=Bad())                # fails after 'x' went into the temporary
  assert np.array_equal(io.load_npz(dst)["x"], np.ones(3)) and _temporaries(tmp_path) == []


def test_stale_temporaries_rule(tmp_path):
  dead, me = _dead_pid(), os.getpid()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    names = {
        f".tmp-p0-{dead}-0a1b2c3d-shard-00001.npz": "removed",  # this index, writer gone
        f"shard-00002.npz.tmp-p0-{dead}": "removed",            # the pair-shard name of earlier versions
        f".tmp-p0-{me}-0a1b2c3d-x.json": "kept",                 # this process's own writer
        f".tmp-p0-{live.pid}-0a1b2c3d-x.json": "kept",           # another live writer on this machine
        f".tmp-p1-{dead}-0a1b2c3d-x.json": "kept",               # another process index (another host)
        f"x.json.tmp-p1-{dead}": "kept",
        ".tmp-notours": "kept", f"x.tmp-{dead}": "kept", "shard-00000.npz": "kept",
    }
    for n in names:
      (tmp_path / n).write_bytes(b"x")
    removed = io.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(n for n, v in names.items() if v == "removed")
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, v in names.items() if v == "kept")
    # keep_pid protects that pid; this process stays protected anyway (it is alive)
    (tmp_path / f".tmp-p0-{dead}-00000000-y").write_bytes(b"x")
    assert io.remove_stale_temporaries(str(tmp_path), keep_pid=dead) == []
    assert io.remove_stale_temporaries(str(tmp_path), keep_pid=1) == [f".tmp-p0-{dead}-00000000-y"]
    assert (tmp_path / f".tmp-p0-{me}-0a1b2c3d-x.json").exists()
  finally:
    live.kill()
    live.wait()
  assert io.remove_stale_temporaries(tmp_path / "missing") == []


def test_killed_writer_leaves_a_temporary_that_a_rerun_removes(tmp_path):
  dst = tmp_path / "f.bin"
  dst.write_bytes(b"good")
  code = ("import os; from dmd_jax import io\n"
          f"with io.atomic_write({str(dst)!r}) as f:\n  f.write(b'partial'); f.flush(); os._exit(0)\n")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  (tmp,) = _temporaries(tmp_path)
  assert tmp.startswith(".tmp-p0-") and dst.read_bytes() == b"good"
  assert io.remove_stale_temporaries(tmp_path) == [tmp] and os.listdir(tmp_path) == ["f.bin"]


def test_writing_does_not_initialise_jax():
  code = ("import tempfile, os; from dmd_jax import io; from jax._src import xla_bridge\n"
          "d = tempfile.mkdtemp(); io.write_bytes(os.path.join(d, 'x'), b'1'); io.remove_stale_temporaries(d)\n"
          "print(xla_bridge.backends_are_initialized())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
  assert out.stdout.strip() == "False"


def test_listdir_exists_remove_makedirs(tmp_path):
  d = str(tmp_path / "d")
  assert not io.exists(d) and not io.isdir(d)
  io.makedirs(io.join(d, "sub"))
  io.makedirs(io.join(d, "sub"))                               # exists: no error
  io.write_bytes(io.join(d, "b.txt"), b"1")
  io.write_bytes(io.join(d, "a.txt"), b"2")
  assert io.listdir(d) == ["a.txt", "b.txt", "sub"]
  assert io.isdir(io.join(d, "sub")) and not io.isdir(io.join(d, "a.txt")) and io.exists(io.join(d, "a.txt"))
  io.remove(io.join(d, "a.txt"))
  io.remove(io.join(d, "a.txt"))                               # missing_ok by default
  with pytest.raises(FileNotFoundError):
    io.remove(io.join(d, "a.txt"), missing_ok=False)
  assert io.listdir(d) == ["b.txt", "sub"]
  with pytest.raises(FileNotFoundError):
    io.listdir(io.join(d, "nope"))
  with pytest.raises(FileNotFoundError):
    io.read_bytes(io.join(d, "nope"))


def test_paths():
  assert io.join("gs://bucket/run", "pairs", "shard.npz") == "gs://bucket/run/pairs/shard.npz"
  assert io.join("gs://bucket/run/", "x") == "gs://bucket/run/x"
  assert io.join("/a/b", "c") == os.path.join("/a/b", "c") and io.join("rel", "c") == os.path.join("rel", "c")
  assert io.is_remote("gs://b/x") and not io.is_remote("/b/x")
  assert str(io.path("gs://bucket/run") / "x") == "gs://bucket/run/x"
  assert io.abspath("gs://b/x") == "gs://b/x" and io.abspath("rel") == os.path.abspath("rel")
  with pytest.raises(ValueError, match="unsupported path 'https://x/y'"):
    io.path("https://x/y")
  with pytest.raises(ValueError, match="empty"):
    io.exists("")
  with pytest.raises(TypeError, match="expected a path"):
    io.exists(3)


def test_prepare_workdir(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="--workdir is required"):
    io.prepare_workdir("")
  f = tmp_path / "a_file"
  f.write_text("x")
  with pytest.raises(ValueError, match=f"--workdir={f} exists and is not a directory"):
    io.prepare_workdir(str(f))
  with pytest.raises(ValueError, match=f"--workdir={f}/run is not a writable directory"):
    io.prepare_workdir(str(f / "run"))                         # a path under a file (root can write anywhere)
  monkeypatch.chdir(tmp_path)
  w = io.prepare_workdir("new/run")
  assert w == str(tmp_path / "new" / "run") and os.path.isdir(w) and os.listdir(w) == []   # probe removed
  stale = os.path.join(w, f".tmp-p0-{_dead_pid()}-00000000-prompt_embeddings_x.npy")
  open(stale, "wb").close()
  assert io.prepare_workdir(w) == w and not os.path.exists(stale)   # a rerun clears stale temporaries


def test_open_memmap_for_write(tmp_path):
  dst = tmp_path / "emb.npy"
  with io.open_memmap_for_write(dst, np.float16, (5, 3)) as arr:
    assert isinstance(arr, np.memmap) and arr.shape == (5, 3) and arr.dtype == np.float16
    arr[:] = np.arange(15).reshape(5, 3)
    assert not dst.exists() and len(_temporaries(tmp_path)) == 1
  back = io.load_npy(io.local_copy(dst), mmap=True)
  assert io.local_copy(dst) == str(dst) and np.array_equal(back, np.arange(15).reshape(5, 3))
  with pytest.raises(RuntimeError):
    with io.open_memmap_for_write(dst, np.float32, (2,)) as arr:
      arr[:] = 7
      raise RuntimeError
  assert np.array_equal(io.load_npy(dst), np.arange(15).reshape(5, 3)) and _temporaries(tmp_path) == []


def _records(data: bytes) -> list[bytes]:
  from tensorboardX.record_writer import masked_crc32c
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("Q", data[i:i + 8])
    assert struct.unpack("I", data[i + 8:i + 12])[0] == masked_crc32c(data[i:i + 8])
    rec = data[i + 12:i + 12 + n]
    assert struct.unpack("I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(rec)
    out.append(rec)
    i += 16 + n
  return out


def test_remote_event_file_rolls_and_tensorboard_reads_every_record(tmp_path, monkeypatch):
  """The sink used for gs:// logdirs, exercised on a local path through tensorboardX itself."""
  from tensorboardX import record_writer
  from tensorboardX.proto import event_pb2
  sinks = []

  def open_file(p):
    sinks.append(writers.RemoteEventFile(p, roll_bytes=300))
    return sinks[-1]

  monkeypatch.setattr(record_writer, "open_file", open_file)
  w = writers.TensorboardXWriter(str(tmp_path))
  for step in range(40):
    w.write_scalars(step, {"loss": step * 0.5})
    if step % 5 == 4:
      w.flush()
  w.close()
  (sink,) = sinks
  files = sorted(n for n in os.listdir(tmp_path) if "tfevents" in n)
  assert len(files) > 2 and files[0] == os.path.basename(sink.path) and files[1].endswith(".00001")
  sizes = [os.path.getsize(tmp_path / n) for n in files]
  assert all(s < 300 + 5 * 60 for s in sizes[:-1]) and all(s >= 300 for s in sizes[:-1])
  events = [event_pb2.Event.FromString(r) for n in files for r in _records((tmp_path / n).read_bytes())]
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in events[1:]]
  assert scalars == [(s, "loss", s * 0.5) for s in range(40)]
  assert _temporaries(tmp_path) == []
  os.remove(tmp_path / files[-1])
  sink.flush()                                                 # nothing new: no upload
  assert not (tmp_path / files[-1]).exists()


def test_remote_logdir_registers_the_io_sink(monkeypatch):
  from tensorboardX import record_writer
  monkeypatch.setattr(record_writer, "REGISTERED_FACTORIES", dict(record_writer.REGISTERED_FACTORIES))
  created = []
  monkeypatch.setattr("tensorboardX.SummaryWriter", lambda logdir: created.append(logdir))
  writers.TensorboardXWriter("gs://bucket/run")
  assert created == ["gs://bucket/run"]
  assert isinstance(record_writer.REGISTERED_FACTORIES["gs"].open("gs://bucket/run/events.x"),
                    writers.RemoteEventFile)
  with pytest.raises(ValueError, match="unsupported path"):
    writers.TensorboardXWriter("ftp://host/run")
