"""Metric writers: ``clu.metric_writers`` to stdout (absl logging) and TensorBoard event files; and the
progress log's filter (:func:`quiet_library_logs`).

clu's own TensorBoard writer needs TensorFlow or torch; ``TensorboardXWriter`` implements clu's
``MetricWriter`` interface on the pure-Python ``tensorboardX`` event-file writer instead.

Remote logdirs (``gs://``): tensorboardX's own ``gs://`` support needs ``google-cloud-storage`` and its own
credentials; here the event files of a remote logdir go through ``dmd_jax.io`` instead (the same
``etils.epath`` backend as every other workdir file), see :class:`RemoteEventFile`.

tensorboardX writes events from a worker thread (it flushes every 120 s by itself) and its ``flush`` does not
wait for that thread; :meth:`TensorboardXWriter.flush` does, so that what was written before a flush is in
the file (on ``gs://``: uploaded) when it returns.
"""
from __future__ import annotations

import importlib.util
import logging as std_logging
import sys
import threading
import types
from io import BytesIO
from typing import Any, Mapping

import numpy as np
from absl import logging

from dmd_jax import io


def _without_tensorflow():
  """clu 0.0.12's ``metric_writers/__init__`` imports its TensorFlow summary writer unconditionally.
  When TensorFlow is absent, register a stand-in for that one module so the rest of clu imports;
  using the stand-in raises."""
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return
  stub = types.ModuleType(name)

  class SummaryWriter:  # pylint: disable=too-few-public-methods
    def __init__(self, *args, **kwargs):
      raise ImportError("clu's SummaryWriter needs TensorFlow; dmd_jax writes TensorBoard files with "
                        "dmd_jax.writers.TensorboardXWriter")

  stub.SummaryWriter = SummaryWriter
  sys.modules[name] = stub


_without_tensorflow()
from clu import metric_writers  # noqa: E402  (after the stand-in above)


class RemoteEventFile:
  """tensorboardX's record sink for an event file on an object store, written through ``dmd_jax.io``.

  Objects cannot be appended to: the records are kept in memory and the file is uploaded whole (atomically,
  ``io.write_bytes``) at each flush that has new records. Once it reaches ``roll_bytes`` it is final, and
  later records go to ``<name>.00001``, ``<name>.00002``, ... (TensorBoard reads every file whose name holds
  ``tfevents``, in name order), which bounds both the memory and each upload. tensorboardX flushes only
  between whole records.
  """

  def __init__(self, path: str, roll_bytes: int = 16 << 20):
    self.path, self.roll_bytes = path, int(roll_bytes)
    self._part, self._buffer, self._dirty = 0, BytesIO(), False
    self._lock = threading.Lock()   # tensorboardX's worker writes while the main thread may flush

  @property
  def current_path(self) -> str:
    return self.path if self._part == 0 else f"{self.path}.{self._part:05d}"

  def write(self, data: bytes) -> None:
    with self._lock:
      self._buffer.write(data)
      self._dirty = True

  def flush(self) -> None:
    with self._lock:
      if not self._dirty:
        return
      io.write_bytes(self.current_path, self._buffer.getvalue())
      self._dirty = False
      if self._buffer.tell() >= self.roll_bytes:
        self._part, self._buffer = self._part + 1, BytesIO()

  def close(self) -> None:
    self.flush()


class _RemoteEventFiles:
  """A tensorboardX writer factory (``record_writer.register_writer_factory``) for one URL scheme."""

  def open(self, path: str) -> RemoteEventFile:
    return RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    pass   # object stores have no folders to create


class _Drain:
  """Counts the events queued to one tensorboardX ``EventFileWriter`` and those its worker thread has
  written, so that :meth:`wait` can return once the queue is drained (tensorboardX's own ``flush`` flushes
  only what the worker has written so far). Does nothing for writers without the expected attributes."""

  def __init__(self, event_file_writer):
    self._cv = threading.Condition()
    self._queued = self._written = 0
    sink = getattr(event_file_writer, "_ev_writer", None)
    if sink is None or not hasattr(event_file_writer, "add_event"):
      return
    add, write = event_file_writer.add_event, sink.write_event

    def add_event(event):
      if not getattr(event_file_writer, "_closed", False):
        with self._cv:
          self._queued += 1
      add(event)

    def write_event(event):
      try:
        return write(event)
      finally:
        with self._cv:
          self._written += 1
          self._cv.notify_all()

    event_file_writer.add_event, sink.write_event = add_event, write_event

  def wait(self, timeout: float = 60.0) -> bool:
    with self._cv:
      return self._cv.wait_for(lambda: self._written >= self._queued, timeout)


class TensorboardXWriter(metric_writers.MetricWriter):
  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter, record_writer
    logdir = str(logdir)
    if io.is_remote(logdir):
      io.path(logdir)   # a scheme etils.epath serves, or a ValueError naming the path
      record_writer.register_writer_factory(logdir.split("://", 1)[0], _RemoteEventFiles())
    self._writer = SummaryWriter(logdir=logdir)
    file_writer = getattr(self._writer, "file_writer", None)
    self._drain = _Drain(getattr(file_writer, "event_writer", None))

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
    for key, value in values.items():
      self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      value = np.asarray(value)
      if value.ndim == 4:
        value = value[0]
      self._writer.add_image(key, value, global_step=step, dataformats="HWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
    for key, value in arrays.items():
      self._writer.add_histogram(key, np.asarray(value), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())), 0)

  def flush(self):
    if not self._drain.wait():
      logging.warning("tensorboardX's writer thread has not written every event after 60 s; flushing anyway")
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_writer(workdir: str, is_main: bool) -> metric_writers.MetricWriter:
  """Logging on every process; TensorBoard event files in ``workdir`` on process 0 only."""
  writers = [metric_writers.LoggingWriter()]
  if is_main:
    writers.append(TensorboardXWriter(workdir))
  return metric_writers.MultiWriter(writers)


class _QuietLibraries:
  """Keeps INFO chatter of Orbax's internals out of the progress log (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Installs :class:`_QuietLibraries` on absl's logger (the command-line entry points call it first)."""
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
