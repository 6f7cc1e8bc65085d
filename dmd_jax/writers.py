"""Metric writers: stdout (absl logging) and TensorBoard event files behind one interface; and the progress
log's filter (:func:`quiet_library_logs`).

:class:`MetricWriter` is clu's ``metric_writers.MetricWriter`` interface (the same methods and arguments), and
:class:`LoggingWriter` / :class:`MultiWriter` write what clu's do; clu itself is not imported: its
``metric_writers`` package imports its TensorFlow summary writer, and this library does not need TensorFlow.
``TensorboardXWriter`` writes the TensorBoard event files with the pure-Python ``tensorboardX``.

Remote logdirs (``gs://``): tensorboardX's own ``gs://`` support needs ``google-cloud-storage`` and its own
credentials; here the event files of a remote logdir go through ``dmd_jax.io`` instead (the same
``etils.epath`` backend as every other workdir file), see :class:`RemoteEventFile`.

tensorboardX writes events from a worker thread (it flushes every 120 s by itself) and its ``flush`` does not
wait for that thread; :meth:`TensorboardXWriter.flush` does, so that what was written before a flush is in
the file (on ``gs://``: uploaded) when it returns.
"""
from __future__ import annotations

import abc
import logging as std_logging
import threading
from io import BytesIO
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from dmd_jax import io


class MetricWriter(abc.ABC):
  """Where metrics go (clu's ``MetricWriter`` interface). ``step`` is the training step; a mapping's keys are the
  metrics' names. Images are ``[N, H, W, C]`` or ``[H, W, C]``, videos ``[N, T, H, W, C]`` or ``[T, H, W, C]``,
  audios ``[N, T, C]`` in [-1, 1]."""

  @abc.abstractmethod
  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    """Arbitrary tensors (``metadata``: a summary's metadata, where the backend has such)."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Scalar values."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]):
    """Images."""

  @abc.abstractmethod
  def write_videos(self, step: int, videos: Mapping[str, Any]):
    """Videos."""

  @abc.abstractmethod
  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    """Audio clips at ``sample_rate`` Hz."""

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Text snippets."""

  @abc.abstractmethod
  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    """Histograms of the arrays' values (``num_buckets``: per name; the backend's default otherwise)."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]):
    """Hyperparameters (a flat mapping), once."""

  @abc.abstractmethod
  def flush(self):
    """Writes out what was buffered."""

  @abc.abstractmethod
  def close(self):
    """Flushes, then releases the writer; nothing may be written after."""


def _histogram(array: np.ndarray, num_buckets: int | None) -> tuple[np.ndarray, np.ndarray] | None:
  """``(counts, edges)`` of ``num_buckets`` (default 30, at least 2) equal bins over the values' range (one bin
  of width 1 around a constant array); None for an empty array."""
  num_buckets = max(num_buckets or 30, 2)
  if array.size == 0:
    return None
  lo, hi = np.min(array), np.max(array)
  if lo == hi:
    return np.asarray([array.size], dtype=np.int64), np.asarray([hi - 0.5, hi + 0.5], dtype=np.float64)
  counts, edges = np.histogram(array, bins=num_buckets, range=(lo, hi))
  return counts, np.asarray(edges, dtype=np.float64)


class LoggingWriter(MetricWriter):
  """Every write as one INFO line of absl's log, in clu's ``LoggingWriter`` format (``[step] a=1, b=0.5``;
  arrays by their shapes)."""

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    logging.info("[%d] Got raw tensors: %s.", step, {k: np.shape(v) for k, v in values.items()})

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images: Mapping[str, Any]):
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.info("[%d] Got videos: %s.", step, {k: np.shape(v) for k, v in videos.items()})

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    logging.info("[%d] Got audios: %s.", step, {k: np.shape(v) for k, v in audios.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    logging.info("[%d] Got texts: %s.", step, texts)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    num_buckets = num_buckets or {}
    for key, value in arrays.items():
      histogram = _histogram(np.asarray(value), num_buckets.get(key))
      if histogram is None:
        continue
      counts, edges = histogram
      bins = [f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}" for i, c in enumerate(counts[:-1])]
      bins.append(f"[{edges[-2]:.3g}, {edges[-1]:.3g}]: {counts[-1]}")   # the last bin is closed
      logging.info("[%d] Histogram for %r = {%s}", step, key, ", ".join(bins))

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("[Hyperparameters] %s", hparams)

  def flush(self):
    logging.flush()

  def close(self):
    self.flush()


class MultiWriter(MetricWriter):
  """Every write to each of ``writers``, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = tuple(writers)

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    for w in self._writers:
      w.write_summaries(step, values, metadata)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for w in self._writers:
      w.write_images(step, images)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    for w in self._writers:
      w.write_videos(step, videos)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    for w in self._writers:
      w.write_audios(step, audios, sample_rate=sample_rate)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for w in self._writers:
      w.write_texts(step, texts)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    for w in self._writers:
      w.write_histograms(step, arrays, num_buckets)

  def write_hparams(self, hparams: Mapping[str, Any]):
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


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


class TensorboardXWriter(MetricWriter):
  """TensorBoard event files in ``logdir`` (local, or remote through :class:`RemoteEventFile`), written by
  tensorboardX. Videos and audios are not written."""

  def __init__(self, logdir: str):
    # imported here: tensorboardX imports torch when torch is installed (1.2 s), and only process 0 writes files
    from tensorboardX import SummaryWriter, record_writer
    logdir = str(logdir)
    if io.is_remote(logdir):
      io.path(logdir)   # a scheme etils.epath serves, or a ValueError naming the path
      record_writer.register_writer_factory(logdir.split("://", 1)[0], _RemoteEventFiles())
    self._writer = SummaryWriter(logdir=logdir)
    file_writer = getattr(self._writer, "file_writer", None)
    self._drain = _Drain(getattr(file_writer, "event_writer", None))

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
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

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
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


def create_writer(workdir: str, is_main: bool) -> MetricWriter:
  """Logging on every process; TensorBoard event files in ``workdir`` on process 0 only."""
  writers = [LoggingWriter()]
  if is_main:
    writers.append(TensorboardXWriter(workdir))
  return MultiWriter(writers)


class _QuietLibraries:
  """Keeps INFO chatter of Orbax's internals out of the progress log (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Installs :class:`_QuietLibraries` on absl's logger (the command-line entry points call it first)."""
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
