"""What every family's export shares (``python -m dmd_jax.export``, docs/export.md): the checkpoint and the
generator's parameters, the files' sizes and progress lines, the manifest's name and format, and the
destination: its checks and the staged folder that replaces it atomically.

The staged folder: everything is written into a temporary sibling folder ``.<DIR name>.export-tmp-<pid>-...``,
which is renamed onto ``DIR`` once complete; an existing ``DIR`` is moved aside first and deleted after the new
one is renamed in. A failed or killed export leaves ``DIR`` as it was; the next export to the same ``DIR``
deletes what a killed one left behind and puts back an old ``DIR`` it had moved aside.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from dmd_jax import checkpoint, io

MANIFEST = "dmd_jax_generator.json"
FORMAT = "dmd_jax.export"
FORMAT_VERSION = 1
_STAGING = re.compile(r"^\.(?P<name>.+)\.export-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


# ---------------------------------------------------------------------------------------------------------
# The checkpoint and the generator's parameters.
# ---------------------------------------------------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps in ``workdir`` (ascending; [] when there is none or no such folder)."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def choose_step(workdir: str, step: int | None = None) -> int:
  """``step`` checked against the checkpoints in ``workdir`` (default: the latest); ``FileNotFoundError``
  when there is none, ``ValueError`` listing the available steps when ``step`` is not one of them."""
  steps = checkpoint_steps(workdir)
  if not steps:
    where = io.join(io.abspath(workdir), "checkpoints")
    raise FileNotFoundError(f"no checkpoint in {where}: train first (python -m dmd_jax.main, same --workdir)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"--step={step}: no such checkpoint in {workdir}; available steps: "
                     f"{', '.join(str(s) for s in steps)}")
  return step


def params_source(gen_state) -> str:
  """Which parameters of the generator state are exported: ``'ema_params'`` when the run keeps an EMA."""
  return "ema_params" if "ema_params" in gen_state else "params"


def generator_network_params(run, gen_state) -> dict:
  """The generator network's full parameters from a restored run, as a nested dict of float32 numpy arrays:
  what every family's writer exports. The sampling parameters (the EMA when there is one): ``run.generator_params``
  (it merges a LoRA generator's adapters onto the teacher's arrays)."""
  params = jax.device_get(run.generator_params(gen_state))
  return jax.tree.map(lambda x: np.asarray(x, np.float32), _plain(params))


def _plain(tree):
  """Flax FrozenDicts / Mappings → plain dicts (leaves unchanged)."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------------------
# Files: sizes, progress, json, safetensors.
# ---------------------------------------------------------------------------------------------------------

def size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def human(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def wrote(path: str, root: str) -> None:
  print(f"wrote {os.path.relpath(path, root)} ({human(size(path))})", flush=True)


def write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.write("\n")


def jsonable(v):
  return json.loads(json.dumps(v, default=str))


def save_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """A float32 state dict as ``.safetensors`` (no pickles); ``metadata`` as the file's string metadata."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file(dict(tensors), path, metadata={"format": "pt", **(metadata or {})})
  os.chmod(path, 0o644)   # safetensors creates its files owner-only; an export is meant to be shared


def read_manifest(folder: str) -> dict:
  """The ``dmd_jax_generator.json`` of an export folder."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder} is not a dmd_jax export (no {MANIFEST})")
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# The destination: checks, a temporary sibling folder, the swap.
# ---------------------------------------------------------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_destination(dst: str, overwrite: bool, keep: Mapping[str, str | None] | None = None) -> str:
  """``dst`` as an absolute local path, or ``ValueError``: a remote path, a file, a non-empty folder without
  ``overwrite``, or a folder holding one of ``keep`` (``{flag: path}``: the workdir, ...)."""
  if not dst:
    raise ValueError("--dst is required (the export's folder)")
  if io.is_remote(dst):
    raise ValueError(f"--dst={dst}: exports are written to a local folder (atomically: a folder rename); "
                     "copy it to the bucket afterwards (e.g. gcloud storage cp -r DIR gs://...)")
  path = os.path.abspath(dst)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"--dst={dst} exists and is not a folder")
  for flag, other in (keep or {}).items():
    if other and not io.is_remote(other) and _inside(other, path):
      raise ValueError(f"--dst={dst} holds {flag}={other}: choose another destination")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ValueError(f"--dst={dst} is not empty: pass --overwrite to replace it (it is replaced only once the "
                     "new export is complete)")
  return path


def _clean_stale(dst: str) -> None:
  """Leftovers of killed exports to ``dst``: temporary folders are deleted; an old export moved aside just
  before the swap is put back when ``dst`` is missing (the kill came between the two renames)."""
  parent, name = os.path.split(dst)
  if not os.path.isdir(parent):
    return
  for entry in sorted(os.listdir(parent)):
    m = _STAGING.match(entry)
    if not m or m["name"] != name or int(m["pid"]) == os.getpid() or io._pid_alive(int(m["pid"])):
      continue
    path = os.path.join(parent, entry)
    if m["kind"] == "old" and not os.path.lexists(dst):
      os.rename(path, dst)
      print(f"restored {dst} (an earlier export was stopped while replacing it)", flush=True)
    else:
      shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
  for d, _, files in os.walk(folder):
    for f in files:
      fd = os.open(os.path.join(d, f), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(dst: str) -> Iterator[str]:
  """Yields a new empty temporary folder next to ``dst`` (absolute, local) which replaces ``dst`` when the
  block ends without an exception, and is deleted otherwise (``dst`` untouched). An existing ``dst`` is
  moved aside, the new folder renamed in, then the old one deleted."""
  parent, name = os.path.split(dst)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(dst)
  stem = f".{name}.export-%s-{os.getpid()}-{secrets.token_hex(4)}"
  tmp = os.path.join(parent, stem % "tmp")
  os.mkdir(tmp)
  try:
    yield tmp
    _fsync_tree(tmp)
    if os.path.lexists(dst):
      old = os.path.join(parent, stem % "old")
      os.rename(dst, old)
      try:
        os.rename(tmp, dst)
      except BaseException:
        os.rename(old, dst)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
