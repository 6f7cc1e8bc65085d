"""One I/O layer for every workdir file: a local path and ``gs://bucket/...`` behave the same.

Everything goes through ``etils.epath`` (as Orbax does): remote paths need its Google Cloud backend, i.e.
``gcsfs`` (``pip install 'etils[epath-gcs]'``) or TensorFlow. Paths are plain strings (or ``os.PathLike``);
``join`` builds them for both kinds.

Writes are atomic (:func:`atomic_write`): the data goes to a temporary name in the destination's folder,
``.tmp-p<process index>-<pid>-<random>-<name>``, which is renamed onto the destination only once it is
complete, so a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

* Local paths: ``os.replace`` in the same folder, an atomic rename (the file is fsynced first).
* ``gs://``: an object only appears once its upload has finished (object writes are all-or-nothing), and the
  rename is gcsfs' ``moveTo`` (Cloud Storage's atomic object move; gcsfs falls back to a server-side copy then
  a delete where a bucket lacks it). The destination object switches from old to new in one step; a run
  killed between the upload and the move leaves the temporary object behind. The data is staged in a local
  temporary file first, so the file object handed out is always a seekable local file, and a temporary
  object is only ever renamed once it is complete.

Temporaries of a killed run stay behind; :func:`remove_stale_temporaries` deletes those of this process
index whose writer is gone (see there for the exact rule).

Remote metadata is never served from a cache: gcsfs, by default, keeps every folder listing it fetched and
answers ``exists`` / ``isdir`` / ``listdir`` — and the size of a file it opens — from it, and only its own
writes update it. A workdir has several writers (the hosts of a pod, a rerun, ``--mode=eval`` next to a
run), so this module turns that cache off for ``gs://`` (:func:`_no_listings_cache`); otherwise a shard
another host wrote would be missed, and a file another process rewrote would be read cut to its old size.
docs/gcs.md has the whole story (and how the tests point every client at a local emulator).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import time
from io import BytesIO, TextIOWrapper
from typing import IO, Any, Iterator

import numpy as np
from etils import epath

_SCHEMES = ("gs", "s3", "az", "hf")   # what etils.epath serves
_LISTING_CACHED = ("gs", "gcs")       # fsspec protocols whose filesystem (gcsfs) caches listings
_CHUNK = 16 << 20
_REMOTE_STALE_SECONDS = 600.0   # a remote temporary younger than this may be another machine's (see below)
# .tmp-p<index>-<pid>-...  (atomic_write), and <name>.tmp-p<index>-<pid> (pair shards of earlier versions)
_TEMPORARY = re.compile(r"^\.tmp-p(\d+)-(\d+)-|\.tmp-p(\d+)-(\d+)$")


def _no_listings_cache() -> None:
  """Makes gcsfs filesystems created from now on (etils.epath creates its one on first use) ask the server
  for every listing and file size instead of a per-process cache that other writers never invalidate.
  Through fsspec's configuration, so an explicit ``use_listings_cache`` setting there wins."""
  try:
    import fsspec.config
  except ImportError:   # no fsspec: no remote paths either
    return
  for protocol in _LISTING_CACHED:
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def is_remote(p) -> bool:
  """True for ``scheme://...`` paths (``gs://``, ...), False for local ones."""
  return "://" in os.fspath(p)


def _str(p) -> str:
  """``p`` as a checked path string: a local path, or a URL with a scheme etils.epath serves."""
  if isinstance(p, bytes) or not isinstance(p, (str, os.PathLike)):
    raise TypeError(f"expected a path (str or os.PathLike), got {type(p).__name__}: {p!r}")
  s = os.fspath(p)
  if not s:
    raise ValueError("expected a path, got an empty string")
  if "://" in s:
    scheme = s.split("://", 1)[0]
    if scheme not in _SCHEMES:
      raise ValueError(f"unsupported path {s!r}: remote paths must start with one of "
                       f"{', '.join(x + '://' for x in _SCHEMES)}")
  return s


def path(p) -> epath.Path:
  """``p`` as an ``etils.epath.Path`` (local or remote)."""
  return p if isinstance(p, epath.Path) else epath.Path(_str(p))


def join(base, *parts) -> str:
  """``os.path.join`` for local paths, ``/``-joined for remote ones; a string either way."""
  base = _str(base)
  parts = [os.fspath(x) for x in parts]
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def abspath(p) -> str:
  """A local path made absolute; a remote one unchanged."""
  s = _str(p)
  return s if is_remote(s) else os.path.abspath(s)


def _split(p: str) -> tuple[str, str]:
  return posixpath.split(p) if is_remote(p) else os.path.split(p)


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def makedirs(p) -> None:
  """Creates folder ``p`` and its parents (no error when it exists)."""
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
  """The names in folder ``p``, sorted."""
  return sorted(c.name for c in path(p).iterdir())


def remove(p, missing_ok: bool = True) -> None:
  """Deletes file ``p``; a missing one is an error only with ``missing_ok=False``."""
  path(p).unlink(missing_ok=missing_ok)


def remove_tree(p) -> None:
  """Deletes folder ``p`` and everything in it; a missing one is no error."""
  if path(p).exists():
    path(p).rmtree()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  """UTF-8 text with universal newlines (as ``open(p)`` reads it)."""
  return TextIOWrapper(BytesIO(read_bytes(p)), encoding="utf-8").read()


def read_json(p) -> Any:
  return json.loads(read_text(p))


def load_npz(p) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` (no pickles), fully read; the file is closed."""
  src = _str(p)
  with np.load(BytesIO(read_bytes(src)) if is_remote(src) else src, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def load_npy(p, mmap: bool = False) -> np.ndarray:
  """An ``.npy`` array (no pickles). ``mmap=True`` memory-maps a local file read-only; a remote file is
  always read into memory (see :func:`local_copy` to memory-map a large remote file)."""
  src = _str(p)
  if is_remote(src):
    return np.load(BytesIO(read_bytes(src)), allow_pickle=False)
  return np.load(src, mmap_mode="r" if mmap else None, allow_pickle=False)


def _process_index() -> int:
  """``jax.process_index()``, without initialising a JAX backend as a side effect (so a file written
  before ``jax.distributed.initialize``, or by a tool next to a running job, does not grab the devices):
  0 while neither the backends nor ``jax.distributed`` are set up (a single process so far)."""
  import jax
  if jax.distributed.is_initialized():
    return jax.process_index()
  try:
    from jax._src import xla_bridge
    ready = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    ready = True
  return jax.process_index() if ready else 0


def _temporary_name(name: str) -> str:
  return f".tmp-p{_process_index()}-{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _upload(src: IO[bytes], dst: str) -> None:
  """Copies the open local file ``src`` (from its start) to remote ``dst`` through a temporary object."""
  folder, name = _split(dst)
  tmp = path(posixpath.join(folder, _temporary_name(name)))
  src.seek(0)
  try:
    with tmp.open("wb") as out:
      shutil.copyfileobj(src, out, _CHUNK)
    tmp.replace(dst)
  except BaseException:
    with contextlib.suppress(Exception):
      tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_write(p, mode: str = "wb") -> Iterator[IO]:
  """Yields a file open for writing (``'wb'``, or ``'w'``: UTF-8 text) that becomes ``p`` when the block
  ends without an exception (parent folders are created). On an exception the temporary is deleted and
  ``p`` is left as it was. See the module docstring for what atomic means on ``gs://``."""
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
  dst = _str(p)
  text = mode == "w"
  if is_remote(dst):
    with tempfile.TemporaryFile() as local:   # unlinked at once: nothing left behind on a kill
      f = TextIOWrapper(local, encoding="utf-8") if text else local
      try:
        yield f
      finally:
        if text:
          with contextlib.suppress(ValueError):
            f.flush()
          f.detach()
      _upload(local, dst)
    return
  folder, name = os.path.split(dst)
  if folder:
    os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, _temporary_name(name))
  try:
    with open(tmp, mode, **({"encoding": "utf-8"} if text else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, dst)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_bytes(p, data: bytes) -> None:
  with atomic_write(p, "wb") as f:
    f.write(data)


def write_text(p, text: str) -> None:
  with atomic_write(p, "w") as f:
    f.write(text)


def write_json(p, obj: Any, **json_kwargs) -> None:
  """``json.dump(obj, **json_kwargs)`` (``indent=1`` unless given), atomically."""
  json_kwargs.setdefault("indent", 1)
  write_text(p, json.dumps(obj, **json_kwargs))


def write_npz(p, /, **arrays) -> None:
  """``np.savez`` (uncompressed), atomically."""
  with atomic_write(p) as f:
    np.savez(f, **arrays)


class _PythonWrites:
  """A file that numpy takes for a plain object with a ``write`` method: ``np.save`` then writes the data in
  chunks through it, so a failed write (a full disk, ENOSPC; a size limit, EFBIG) raises. Handed the real file,
  ``np.save`` calls ``ndarray.tofile``, whose C-level buffering loses that error: the file is left short, with no
  exception, and the atomic rename would then make the cut file look complete (measured: docs/reliability.md)."""

  def __init__(self, f):
    self.write = f.write


def write_npy(p, array) -> None:
  """``np.save`` (no pickles) atomically, every write error raised (:class:`_PythonWrites`)."""
  with atomic_write(p) as f:
    np.save(_PythonWrites(f), np.asarray(array), allow_pickle=False)


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


def _older_than(p, seconds: float) -> bool:
  """Whether file ``p`` was last modified more than ``seconds`` ago (False when it is gone)."""
  try:
    return time.time() - path(p).stat().mtime > seconds
  except FileNotFoundError:
    return False


def remove_stale_temporaries(folder, keep_pid: int | None = None) -> list[str]:
  """Deletes the temporaries that killed writers of this process index left in ``folder``; returns their
  names.

  A name ``.tmp-p<i>-<pid>-...`` (or ``<name>.tmp-p<i>-<pid>``, the pair shards of earlier versions) is
  stale when ``i`` is this process index (other indices belong to other hosts, which may be writing now),
  ``pid`` is not ``keep_pid`` (default: this process), and no process ``pid`` is alive on this machine
  (another live writer here keeps its file; a recycled pid only means a stale file is kept, never that a
  live one is deleted). A missing folder has nothing to remove.

  In a remote folder the pid rule alone is not enough: machines that share a bucket do not share pids (a
  run on a pod and ``--mode=eval`` on another VM are both process index 0). A remote temporary must also be
  older than ``_REMOTE_STALE_SECONDS``: it only appears once its upload is complete and its writer renames
  it right then, so an older one has no writer left.
  """
  keep = os.getpid() if keep_pid is None else int(keep_pid)
  me = _process_index()
  remote = is_remote(_str(folder))
  if not exists(folder):
    return []
  removed = []
  for name in listdir(folder):
    m = _TEMPORARY.search(name)
    if not m:
      continue
    index, pid = (int(m[1]), int(m[2])) if m[1] is not None else (int(m[3]), int(m[4]))
    if index != me or pid == keep or _pid_alive(pid):
      continue
    if remote and not _older_than(join(folder, name), _REMOTE_STALE_SECONDS):
      continue
    remove(join(folder, name))
    removed.append(name)
  return removed


def _probe_remote(workdir: str) -> None:
  try:   # the probe first: some gcsfs versions' makedirs would create a missing (misspelt) bucket
    probe = path(join(workdir, f".write-test-p{_process_index()}-{os.getpid()}"))
    probe.write_text("ok")
    probe.unlink()
    makedirs(workdir)   # a no-op on flat buckets; a folder on hierarchical-namespace ones
  except ImportError as e:
    raise ValueError(f"--workdir={workdir} needs a Google Cloud Storage backend for etils.epath: "
                     f"pip install 'etils[epath-gcs]' (gcsfs) or tensorflow ({e})") from e
  except Exception as e:  # auth, missing bucket, permissions: the backends raise various types
    bucket = workdir.split("://", 1)[1].split("/", 1)[0]
    hint = (f" (bucket {bucket!r} does not exist, or these credentials cannot see it)"
            if isinstance(e, FileNotFoundError) else "")   # gcsfs: the upload's 404
    raise ValueError(f"--workdir={workdir} is not a writable folder{hint}: {type(e).__name__}: {e}") from e


def prepare_workdir(workdir, probe: bool = True) -> str:
  """Creates ``workdir`` and checks that files can be written there; returns it (local paths made
  absolute). Clears stale temporaries of this process index from it. ValueError naming the problem when
  it is empty, a file, or not writable. ``probe=False`` (remote workdirs): neither probe nor create — for the
  other processes of a job whose process 0 has prepared the folder (``train.start_process``; two processes
  probing one gcs:// folder at once raced in gcsfs's listings)."""
  if not workdir:
    raise ValueError("--workdir is required")
  workdir = _str(workdir)
  if is_remote(workdir):
    workdir = str(path(workdir))
    if probe:
      _probe_remote(workdir)
  else:
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"--workdir={workdir} exists and is not a directory")
    try:
      os.makedirs(workdir, exist_ok=True)
      probe_file = os.path.join(workdir, f".write-test-p{_process_index()}-{os.getpid()}")
      with open(probe_file, "w") as f:
        f.write("ok")
      os.remove(probe_file)
    except OSError as e:
      raise ValueError(f"--workdir={workdir} is not a writable directory: {e}") from e
  remove_stale_temporaries(workdir)
  return workdir


def local_cache_dir() -> str:
  """Where local copies of remote files live: ``$DMD_JAX_LOCAL_CACHE``, else a folder under the system
  temporary directory."""
  return os.environ.get("DMD_JAX_LOCAL_CACHE") or os.path.join(
      tempfile.gettempdir(), f"dmd_jax_remote_files_{os.getuid() if hasattr(os, 'getuid') else 0}")


def _mirror_path(remote: str) -> str:
  key = hashlib.sha256(remote.encode("utf-8")).hexdigest()[:16]
  return os.path.join(local_cache_dir(), key, posixpath.basename(remote))


def _same_copy(local: str, remote_stat) -> bool:
  """Whether ``local`` is the copy of a remote file with ``remote_stat``: same size, and the remote object's
  modification time (whole seconds), which :func:`_stamp` gives every copy."""
  return (os.path.exists(local) and os.path.getsize(local) == remote_stat.length
          and int(os.path.getmtime(local)) == int(remote_stat.mtime or 0))


def _stamp(local: str, remote_stat) -> None:
  mtime = int(remote_stat.mtime or 0)
  os.utime(local, (mtime, mtime))


def local_copy(p) -> str:
  """A local path holding the contents of ``p``: ``p`` itself when local; for a remote file a copy under
  :func:`local_cache_dir`, downloaded (atomically) unless the copy there has the remote file's size and
  modification time (so a file rewritten under the same name, e.g. in a workdir deleted and made again, is
  downloaded again). Meant for large files read many times, to memory-map them."""
  src = _str(p)
  if not is_remote(src):
    return src
  local = _mirror_path(src)
  st = path(src).stat()
  if _same_copy(local, st):
    return local
  remove_stale_temporaries(os.path.dirname(local))
  with atomic_write(local) as out, path(src).open("rb") as f:
    shutil.copyfileobj(f, out, _CHUNK)
  _stamp(local, st)
  return local


@contextlib.contextmanager
def open_memmap_for_write(p, dtype, shape) -> Iterator[np.memmap]:
  """Yields a new writable ``.npy`` array, memory-mapped (it never has to fit in host memory), that
  becomes ``p`` atomically when the block ends without an exception (deleted otherwise).

  Local ``p``: the array is a temporary ``.npy`` in ``p``'s folder, renamed onto ``p``. Remote ``p``: it is
  built in :func:`local_cache_dir`, uploaded to ``p`` at the end (temporary object, then rename), and kept
  there as ``p``'s :func:`local_copy`.
  """
  dst = _str(p)
  local = _mirror_path(dst) if is_remote(dst) else dst
  folder, name = os.path.split(local)
  if folder:
    os.makedirs(folder, exist_ok=True)
  remove_stale_temporaries(folder or ".")   # a killed run's half-written array can be large
  tmp = os.path.join(folder, _temporary_name(name))
  try:
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    yield arr
    arr.flush()
    del arr
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
      if is_remote(dst):
        _upload(f, dst)
    os.replace(tmp, local)
    if is_remote(dst):
      _stamp(local, path(dst).stat())   # the local array is dst's local_copy
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
