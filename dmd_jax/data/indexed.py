"""Host-fed data as random-access datasets indexed by step: ``records -> shuffle(seed) per epoch -> repeat ->
batch -> [step]``.

Every host-fed source of training data goes through here: the regression pairs (``train.batches``), the prompt
ids of the DM batch (``families.base.PromptConditions``), the GAN critic's real images and latents
(``data/real.py``) and the EDM teacher trainer's images (``teacher_train.py``). The global batch of step ``s``
is a pure function of (seed, ``s``, batch size), and a process reads only its rows of it
(``sharding.process_slice``), so:

* the rows do not depend on the process count (the processes' rows, concatenated, are the one-process batch);
* resuming at step ``s`` needs no iterator state: the step is the position.

**Order** (:class:`EpochSampler`): epoch ``e`` is the permutation ``default_rng((*seed, e)).permutation(n)``
of the record indices, and step ``s`` takes stream positions ``[s·B, (s+1)·B)`` of the epochs laid end to end
(a batch may straddle two epochs). These numbers are part of the results: the exact-resume tests and the
digits study depend on them bit for bit.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Callable, Iterable, Mapping

import numpy as np


class EpochSampler:
  """Deterministic batches of item indices: epoch e is a permutation of ``range(num_items)`` drawn from
  ``default_rng((*seed, e))``, and step s takes the next ``batch_size`` positions — so the order after a
  resume is the same. ``seed``: an int or a seed tuple (``streams.numpy_seed(config.seed, stream)``)."""

  def __init__(self, num_items: int, batch_size: int, seed):
    self.n, self.b = num_items, batch_size
    self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (int(seed),)
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch):
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    pos = step * self.b + np.arange(self.b)
    epochs, offs = np.divmod(pos, self.n)
    out = np.empty(self.b, np.int64)
    for e in np.unique(epochs):
      m = epochs == e
      out[m] = self._perm(int(e))[offs[m]]
    return out


class StepIndexed:
  """``num_records`` records read by ``read(indices) -> {name: array with one row per index}`` (any order,
  repeats allowed), visited in epoch order on ``seed``: ``batch(step, batch_size, rows)`` is rows ``rows`` of
  the global batch of ``step``, and only those records are read."""

  def __init__(self, num_records: int, seed, read: Callable[[np.ndarray], Mapping[str, np.ndarray]]):
    if num_records < 1:
      raise ValueError(f"a step-indexed dataset needs records, got {num_records}")
    self.num_records, self.seed, self.read = int(num_records), seed, read
    self._samplers: dict[int, EpochSampler] = {}

  def __len__(self) -> int:
    return self.num_records

  def indices(self, step: int, batch_size: int) -> np.ndarray:
    """The record indices of the global batch of ``step`` (int64 [batch_size])."""
    if batch_size not in self._samplers:
      self._samplers[batch_size] = EpochSampler(self.num_records, batch_size, self.seed)
    return self._samplers[batch_size].indices(int(step))

  def batch(self, step: int, batch_size: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    return dict(self.read(self.indices(step, batch_size)[rows]))


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def parallel_map(fn: Callable, items: Iterable) -> list:
  """``[fn(x) for x in items]`` on a thread pool shared by every source of the process: reading and decoding
  records (ArrayRecord reads, OpenCV / PIL image decoding, resizing) release the GIL, so a batch's records are
  read in parallel."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                    thread_name_prefix="data_read")
  return list(_POOL.map(fn, items))
