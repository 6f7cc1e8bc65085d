"""Orbax checkpoints under ``<workdir>/checkpoints/<step>``: the train state (generator and fake score with
their optimizer states, the step) plus a JSON item with the config and metadata. The frozen teacher is not
saved: the config names its converted weights.

A run killed mid-save keeps the previous good checkpoint, and ``latest_step`` never returns a half-written
one: on a local disk Orbax writes each step to a temporary folder and renames it when complete; on ``gs://``
(no folder renames) it writes ``<step>/`` in place and marks it complete with a ``commit_success.txt``
written last, and a step without one is ignored, then overwritten by the next save of that step. Orbax
does its own I/O — array data through TensorStore's gcs driver, the rest through ``etils.epath`` — so
``workdir`` may be local or ``gs://`` (docs/gcs.md; as everywhere, ``dmd_jax.io``).

Integrity (docs/reliability.md). A committed checkpoint can still be damaged afterwards (a truncated or
deleted file, a flipped bit). Orbax notices some of that (a missing or cut file, OCDBT's checksummed index
nodes) but not a changed byte inside an array chunk: the chunks are zstd frames without a content checksum
and random floats are stored as raw blocks, so the restore returns silently different numbers. Every save
therefore records, in the JSON item under ``'checksums'``, each array's dtype, shape and a checksum of its bits
(:func:`checksums`: computed on the devices, the same whatever the sharding) and a CRC-32 of the JSON item
itself; :meth:`Checkpointer.restore` verifies them. :meth:`Checkpointer.restore_newest_intact` (the trainer's
resume) tries the steps newest first, moves the damaged ones aside to ``<workdir>/checkpoints_damaged/`` and
restores the newest intact one, with every process of a multi-process job deciding the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dmd_jax import io

CHECKSUMS = "checksums"   # the JSON item's key of the integrity record (stripped from what restores return)
_RECORD_VERSION = 1


class CheckpointDamaged(RuntimeError):
  """A checkpoint that cannot be read back as it was written; or, from ``restore_newest_intact``, none can."""


class CheckpointSaveError(OSError):
  """A checkpoint save failed (a full disk, a write error); the message names the checkpoint folder."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict
  damaged: list            # [(step, reason, where it was moved)] of the newer steps that did not restore


class Checkpointer:
  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = io.path(io.join(io.abspath(workdir), "checkpoints"))
    self.damaged_directory = io.join(os.fspath(self.directory) + "_damaged")
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             read_only=read_only))
    self._pending: int | None = None    # the step of the save in flight (its errors surface later)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, ascending."""
    return sorted(int(s) for s in self._mngr.all_steps())

  def step_directory(self, step: int) -> str:
    return io.join(os.fspath(self.directory), str(step))

  # ---- saving ----

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save; call ``wait`` before exiting. The JSON item gets the integrity record
    (module docstring). A failure of the save before (surfacing here) or of this one is a
    :class:`CheckpointSaveError` naming the checkpoint's folder."""
    self.wait()
    meta = with_record(meta, self.checksums(state))
    self._pending = step
    try:
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:   # pylint: disable=broad-except  (re-raised with the folder named)
      self._raise_save_error(e)

  def wait(self) -> None:
    try:
      self._mngr.wait_until_finished()
    except Exception as e:   # pylint: disable=broad-except  (re-raised with the folder named)
      self._raise_save_error(e)
    self._pending = None

  def _raise_save_error(self, e: Exception) -> None:
    step, self._pending = self._pending, None
    kept = [s for s in self.all_steps() if s != step]
    msg = (f"saving checkpoint {step} to {self.step_directory(step)} failed ({type(e).__name__}: "
           f"{str(e).splitlines()[0][:500] if str(e) else ''}). The earlier checkpoints in {self.directory} "
           f"({', '.join(map(str, kept)) or 'none'}) are untouched: free space or fix the error, then rerun to "
           f"resume from {'step ' + str(kept[-1]) if kept else 'the start'}")
    logging.error("%s", msg)
    errno = getattr(e, "errno", None)
    raise (CheckpointSaveError(errno, msg) if errno else CheckpointSaveError(msg)) from e

  # ---- restoring ----

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores straight into the shardings of ``abstract_state`` (a pytree of ShapeDtypeStructs), verified
    against the checkpoint's integrity record (:class:`CheckpointDamaged` on a difference; checkpoints
    written before the record existed are not verified). Every process calls it."""
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
    record = check_meta_record(out["meta"], f"checkpoint {step} in {self.directory}")
    if record is not None:
      bad = self._mismatches(out["state"], record)
      if bad:
        raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged: {bad}")
    return out["state"], strip_record(out["meta"])

  def restore_meta(self, step: int) -> dict:
    return strip_record(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore_newest_intact(self, abstract_state: Any,
                            check: Callable[[int, dict], None] | None = None) -> Restored | None:
    """The newest checkpoint that reads back as it was written, restored into ``abstract_state``'s shardings;
    None when there is no checkpoint. Damaged newer steps are logged, then moved to
    ``<workdir>/checkpoints_damaged/<step>-<n>/`` once an intact one is found (kept, never deleted); when none
    is intact nothing is moved and :class:`CheckpointDamaged` names every step and why.

    ``check(step, meta)`` (a config-compatibility check on the step's JSON item, e.g. the GAN stage) runs
    before the state is read; its errors are the caller's, never damage. So is a train state of other arrays
    than ``abstract_state``'s (a changed config): a ``ValueError`` naming the differences, nothing moved.

    Every process of a multi-process job calls it: they try the same steps in the same order and agree after
    each read (a step damaged for one process is damaged for all), so all restore the same step."""
    steps = self._agreed_steps()
    expected = _abstract_entries(abstract_state)
    tried = []
    for step in reversed(steps):
      where = f"checkpoint {step} in {self.directory}"
      reason = self._try_step(step, where, expected, abstract_state, check)
      if isinstance(reason, str):
        logging.warning("DAMAGED CHECKPOINT: %s cannot be restored (%s); trying the next older one", where,
                        reason)
        tried.append((step, reason))
        continue
      state, meta = reason
      damaged = [(s, why, self._move_aside(s)) for s, why in tried]
      if damaged:
        self._mngr.reload()
      return Restored(step, state, meta, damaged)
    if tried:
      raise CheckpointDamaged(
          f"no checkpoint in {self.directory} can be restored; tried, newest first: "
          + "; ".join(f"step {s}: {why}" for s, why in tried)
          + f". Nothing was moved. Restore the folder from a copy, or move {self.directory} away to start "
          "this run afresh")
    return None

  def _try_step(self, step, where, expected, abstract_state, check):
    """``(state, meta)`` of ``step``, or the reason (a string) why it is damaged; the same on every process."""
    folder = io.path(self.step_directory(step))
    # 1. the JSON item, its CRC, and what arrays the checkpoint holds (local reads, then agreement)
    try:
      meta = ocp.JsonCheckpointHandler().restore(folder / "meta", args=ocp.args.JsonRestore())
      record = check_meta_record(meta, where)
      held = record_entries(record) if record is not None else _orbax_entries(folder / "state")
      local = None
    except Exception as e:   # pylint: disable=broad-except  (any read error of a committed step: damage)
      _reraise_resource_errors(e)
      local = _describe(e)
    reason = _agree(local, "meta")
    if reason:
      return reason
    # 2. the caller's and the structure's compatibility: errors are the config's, raised on every process
    if check is not None:
      check(step, strip_record(meta))
    differences = _differences(held, expected)
    if differences:
      raise ValueError(
          f"{where} holds a train state of other arrays than this config builds ({differences}): a changed "
          "network, optimiser or method needs a new --workdir (init_from.workdir can start it from this run's "
          "networks)")
    # 3. the arrays (local reads, then agreement)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(folder / "state", args=ocp.args.StandardRestore(abstract_state))
      local = None
    except Exception as e:   # pylint: disable=broad-except
      _reraise_resource_errors(e)
      state, local = None, _describe(e)
    finally:
      handler.close()
    reason = _agree(local, "state")
    if reason:
      return reason
    # 4. the values (a computation over every process: the same answer everywhere)
    bad = self._mismatches(state, record) if record is not None else _non_finite(state)
    return bad or (state, strip_record(meta))

  def checksums(self, state: Any) -> dict[str, list]:
    """``{array name: [dtype, shape, checksum]}`` of the arrays of ``state`` (:func:`checksums`)."""
    return checksums(state)

  def _mismatches(self, state, record: dict) -> str:
    """'' when ``state``'s arrays have the recorded checksums, else which do not."""
    got = self.checksums(state)
    want = record_entries(record, with_sums=True)
    bad = sorted(k for k in want if got.get(k) != want[k])
    if not bad:
      return ""
    return (f"{len(bad)} of {len(want)} arrays differ from their checksums recorded at save time "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")

  def _agreed_steps(self) -> list[int]:
    steps = self.all_steps()
    if jax.process_count() > 1:
      digest = zlib.crc32(json.dumps(steps).encode()) & 0x7FFFFFFF
      seen = np.asarray(multihost_utils.process_allgather(np.asarray([digest], np.int32))).reshape(-1)
      if len(set(seen.tolist())) > 1:
        raise RuntimeError(f"the processes list different checkpoints in {self.directory} (this one: {steps}); "
                           "a shared workdir must look the same to every process")
    return steps

  def _move_aside(self, step: int) -> str:
    """Moves ``<step>/`` to ``checkpoints_damaged/<step>-<n>/`` (process 0; every process waits) and returns
    the new place."""
    src = self.step_directory(step)
    dst, local = None, None
    _barrier(f"checkpoint {step}: move aside")
    if jax.process_index() == 0:
      try:
        io.makedirs(self.damaged_directory)
        taken = set(io.listdir(self.damaged_directory)) if io.isdir(self.damaged_directory) else set()   # gs://
        n = next(i for i in range(len(taken) + 1) if f"{step}-{i}" not in taken)
        dst = io.join(self.damaged_directory, f"{step}-{n}")
        move_tree(src, dst)
        logging.warning("DAMAGED CHECKPOINT: moved checkpoint %d from %s to %s (kept for inspection)", step, src,
                        dst)
      except Exception as e:   # pylint: disable=broad-except  (every process raises it below)
        local = _describe(e)
    reason = _agree(local, "folder move")   # also the barrier after the move
    if reason:
      raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged and could not be moved to "
                              f"{self.damaged_directory} ({reason}): move it away by hand, then rerun")
    return dst or self.damaged_directory

  def close(self) -> None:
    self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# The integrity record.
# ---------------------------------------------------------------------------------------------------------

def array_name(path) -> str:
  """An array's name in a checkpoint: its tree path's keys joined by '.' (as Orbax names the array's folder:
  ``generator.opt_state.1.mu.mlp.dense0.kernel``)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _named_arrays(tree) -> dict[str, Any]:
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, (jax.Array, np.ndarray)) and _bits_dtype(x.dtype) is not None:
      out[array_name(path)] = x
  return out


def _bits_dtype(dtype):
  """The unsigned integer type of ``dtype``'s bits (None: not checksummed)."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return None
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return np.uint8
  if dtype.kind not in "iuf" and dtype.name not in ("bfloat16",) and not dtype.name.startswith("float8"):
    return None
  return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(dtype.itemsize)


def _bits_checksum(x) -> jax.Array:
  """The sum of ``x``'s bits read as unsigned integers (32-bit words; 8- and 16-bit types widened), modulo 2^32.
  Any single flipped bit changes it (by a power of two below 2^32), a random change of many bits escapes it with
  probability 2^-32, and integer addition makes it the same for every sharding and reduction order. Elementwise
  plus one reduction (no reshape, so no resharding, and a small program: ~1.3 s of XLA:CPU compilation per 1000
  arrays, docs/reliability.md). Not position-weighted: elements swapped within an array go unnoticed, which
  storage damage does not do."""
  if x.dtype == jnp.bool_:
    return jnp.sum(x, dtype=jnp.uint32)
  bits = jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))
  return jnp.sum(bits, dtype=jnp.uint32)


def _checksums_of(arrays: dict) -> dict:
  return {k: _bits_checksum(x) for k, x in arrays.items()}


_checksums_jit = jax.jit(_checksums_of)


def _scalar(x) -> int:
  """A replicated scalar's value on any process (``device_get`` wants a fully addressable array)."""
  return int(np.asarray(x.addressable_data(0)))


def checksums(state: Any) -> dict[str, list]:
  """``{name: [dtype, shape, checksum]}`` for the arrays of ``state`` (others, e.g. PRNG keys, are left out):
  one jitted program over the whole state on its devices (a collective in a multi-process job: every process
  calls it), so only the scalars come back to the host."""
  arrays = _named_arrays(state)
  sums = _checksums_jit(arrays)
  return {k: [np.dtype(x.dtype).name, list(x.shape), _scalar(sums[k])] for k, x in arrays.items()}


def _canonical(meta: dict) -> bytes:
  return json.dumps(json.loads(json.dumps(meta)), sort_keys=True).encode()


def with_record(meta: dict, sums: dict) -> dict:
  """``meta`` plus the integrity record: the arrays' checksums and a CRC-32 of the whole JSON item."""
  meta = {**strip_record(meta), CHECKSUMS: {"version": _RECORD_VERSION, "arrays": sums}}
  meta[CHECKSUMS]["meta_crc32"] = zlib.crc32(_canonical(meta))
  return meta


def strip_record(meta: dict) -> dict:
  return {k: v for k, v in meta.items() if k != CHECKSUMS}


def check_meta_record(meta: dict, where: str) -> dict | None:
  """The integrity record of a checkpoint's JSON item after checking the item's CRC (:class:`CheckpointDamaged`
  on a difference); None for checkpoints written before records existed."""
  record = meta.get(CHECKSUMS)
  if record is None:
    return None
  if not isinstance(record, dict) or "meta_crc32" not in record or "arrays" not in record:
    raise CheckpointDamaged(f"{where}: its integrity record is malformed")
  body = {**meta, CHECKSUMS: {k: v for k, v in record.items() if k != "meta_crc32"}}
  if zlib.crc32(_canonical(body)) != record["meta_crc32"]:
    raise CheckpointDamaged(f"{where}: its JSON item (meta/metadata) differs from what was written (CRC-32)")
  if record.get("version") != _RECORD_VERSION:
    logging.warning("%s has an integrity record of version %s (this version reads %d): its arrays are not verified",
                    where, record.get("version"), _RECORD_VERSION)
    return None
  return record


def record_entries(record: dict, with_sums: bool = False) -> dict:
  """``{name: (dtype, shape)}`` (``with_sums``: ``[dtype, shape, checksum]``) of an integrity record."""
  arrays = record["arrays"]
  return {k: list(v) for k, v in arrays.items()} if with_sums else {k: (v[0], tuple(v[1])) for k, v in arrays.items()}


def _abstract_entries(abstract_state) -> dict:
  return {array_name(p): (np.dtype(x.dtype).name, tuple(x.shape))
          for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
          if _bits_dtype(x.dtype) is not None}


def _orbax_entries(state_folder) -> dict:
  """``{name: (dtype, shape)}`` from Orbax's own metadata (checkpoints without an integrity record)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(state_folder)
  finally:
    handler.close()
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(m, "shape") and hasattr(m, "dtype") and _bits_dtype(m.dtype) is not None:
      out[array_name(path)] = (np.dtype(m.dtype).name, tuple(m.shape))
  return out


def _differences(held: dict, expected: dict) -> str:
  """'' when the checkpoint holds the arrays (names, dtypes, shapes) this config builds."""
  missing = sorted(set(expected) - set(held))
  extra = sorted(set(held) - set(expected))
  changed = sorted(k for k in set(held) & set(expected) if tuple(held[k]) != tuple(expected[k]))
  parts = []
  for what, names in (("not in the checkpoint", missing), ("only in the checkpoint", extra)):
    if names:
      parts.append(f"{len(names)} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
  if changed:
    k = changed[0]
    parts.append(f"{len(changed)} of other dtype or shape, e.g. {k}: checkpoint {held[k][0]}{list(held[k][1])}, "
                 f"config {expected[k][0]}{list(expected[k][1])}")
  return "; ".join(parts)


def _non_finite(state) -> str:
  """For checkpoints without a record: '' unless a floating-point array holds NaN or infinity."""
  floats = {k: x for k, x in _named_arrays(state).items() if jnp.issubdtype(x.dtype, jnp.floating)}
  flags = jax.jit(lambda t: {k: jnp.all(jnp.isfinite(x)) for k, x in t.items()})(floats)
  bad = sorted(k for k, f in flags.items() if not bool(np.asarray(f.addressable_data(0))))
  return f"non-finite values in {', '.join(bad[:5])}" if bad else ""


def _describe(e: BaseException) -> str:
  """One line: the exception and, when it wraps another (Orbax wraps TensorStore's), the innermost one."""
  def line(x):
    text = str(x).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(x).__name__}: {text[0][:300] if text else ''}"
  inner, seen = e, {id(e)}
  while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
    inner = nxt
    seen.add(id(inner))
  return line(e) if inner is e else f"{line(e)} <- {line(inner)}"


def _reraise_resource_errors(e: Exception) -> None:
  """Out of memory is not damage."""
  if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
    raise e


def _agree(local_reason: str | None, what: str) -> str | None:
  """Every process's verdict on a read: None if all succeeded, else this process's reason (or that another
  process failed). One small all-gather in a multi-process job; nothing with one process."""
  if jax.process_count() == 1:
    return local_reason
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([local_reason is not None], np.int32)))
  failed = [i for i, f in enumerate(flags.reshape(-1)) if f]
  if not failed:
    return None
  return local_reason or f"reading its {what} failed on process(es) {failed} (their logs say why)"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def move_tree(src: str, dst: str) -> None:
  """Moves folder ``src`` to ``dst`` (which must not exist): a rename on a local disk; on ``gs://`` (no folder
  renames) ``commit_success.txt`` is deleted first (so Orbax stops counting the step at once), then every object
  is copied and the source deleted."""
  if not io.is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)
    return
  source, target = io.path(src), io.path(dst)
  marker = source / "commit_success.txt"
  content = marker.read_bytes() if marker.exists() else None
  if content is not None:
    marker.unlink()
  def copy(folder, out):   # epath's recursive glob is refused on gs://
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
      if f.is_dir():
        copy(f, out / f.name)
      else:
        f.copy(out / f.name)
  copy(source, target)
  if content is not None:
    (target / "commit_success.txt").write_bytes(content)
  source.rmtree()
