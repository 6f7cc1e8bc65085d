"""Preemption: SIGTERM → the same checkpoint step on every process → ``sharding.PREEMPTED_EXIT_CODE``
(docs/multihost.md)."""
from __future__ import annotations

import os
import signal

import jax
from absl import logging


class Preempted(Exception):
  """Raised after a SIGTERM's checkpoint is saved: ``main`` exits with ``sharding.PREEMPTED_EXIT_CODE``."""


class Preemption:
  """SIGTERM (a preemption notice) → finish the current step, save a checkpoint, exit with
  ``sharding.PREEMPTED_EXIT_CODE``; a second SIGTERM exits at once. With several processes every one must
  save at the same step: the first process to see a SIGTERM publishes ``stop_at = its step + 2 max_steps_in_flight + 4``
  in the coordination service's key-value store (first writer wins), and every process polls it each step.
  Hosts stay within ``max_steps_in_flight`` + 1 steps of each other (the steps' collectives pace them), so
  no process has passed ``stop_at`` when it reads it."""

  KEY = "dmd_jax/preemption/stop_at"

  def __init__(self, max_steps_in_flight: int):
    self.stop_margin = 2 * max_steps_in_flight + 4
    self.signalled = False
    self.stop_at = None
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    if self.signalled:
      logging.error("second SIGTERM: exiting now, without a checkpoint")
      os._exit(128 + signal.SIGTERM)
    logging.warning("SIGTERM received: saving a checkpoint, then exiting (a second SIGTERM exits at once)")
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (called by every process at every step)."""
    if jax.process_count() == 1:
      return self.signalled
    if self.stop_at is None:
      from jax._src import distributed
      client = distributed.global_state.client
      if self.signalled:
        try:
          client.key_value_set(self.KEY, str(step + self.stop_margin))
        except Exception:   # another process published first: its value holds
          pass
      try:
        value = client.key_value_try_get(self.KEY)
      except Exception:   # not published: no process has been signalled
        value = None
      if value:
        self.stop_at = int(value)
        logging.warning("preemption: every process saves and stops after step %d", self.stop_at)
    return self.stop_at is not None and step >= self.stop_at

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)
