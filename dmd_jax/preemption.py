"""Stop signals (docs/multihost.md): SIGTERM → the same checkpoint step on every process →
``distributed.PREEMPTED_EXIT_CODE``; a second SIGTERM or SIGINT → exit at once, even from inside a collective.

Python runs a signal handler only when the main thread returns to the interpreter, which never happens while
it waits for a stuck collective (a peer stopped or gone). So the decisions here are taken on a watcher
thread: Python's C-level handler writes each signal's number to a pipe (``signal.set_wakeup_fd``), and the
thread, which only needs the GIL (every wait for a device or a collective releases it), reads the pipe and
acts:

* a SIGTERM while the training loop runs (a :class:`Preemption` is active): marks it; the loop saves a
  checkpoint and exits with ``PREEMPTED_EXIT_CODE`` (42);
* a SIGTERM at any other time (setup, pairs, compiling, evaluation, sampling): exits at once with 143, what
  the default disposition did before ``jax.distributed.initialize`` replaced it (its preemption notifier
  only records the signal, so a multi-process ``--mode=eval`` ignored SIGTERM);
* a first SIGINT: Python's ``KeyboardInterrupt`` in the main thread, as usual;
* a SIGTERM or SIGINT while an earlier one is pending: exits at once, without a checkpoint, with
  ``128 + signal`` (143 for SIGTERM, 130 for SIGINT) and one line on stderr.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging

from dmd_jax import distributed

# Exit codes of the immediate exits: what a shell reports for a process killed by the signal.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM    # 143
SIGINT_EXIT_CODE = 128 + signal.SIGINT      # 130


class Preempted(Exception):
  """Raised after a SIGTERM's checkpoint is saved: ``main`` exits with ``distributed.PREEMPTED_EXIT_CODE``."""


def _exit_now(code: int, message: str) -> None:
  """One line on stderr (written directly: the logging handlers may hold locks of a stuck thread), then
  ``os._exit`` — no atexit handlers, no ``jax.distributed`` shutdown barrier that a stuck peer never joins."""
  try:
    os.write(2, f"dmd_jax: {message}; exiting now with code {code}\n".encode())
  except OSError:
    pass
  os._exit(code)


def _ignore(signum, frame):
  """Python-level SIGTERM handler: the watcher thread decides (it has already seen the signal)."""
  del signum, frame


class _Watcher:
  """The process's stop-signal watcher (module docstring); one per process, installed by :func:`install`."""

  def __init__(self):
    self.lock = threading.Lock()
    self.pending: str | None = None           # the first stop signal seen, by name
    self.preemption: Preemption | None = None  # the active training loop's
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)       # set_wakeup_fd's requirement; a full pipe drops bytes, not signals
    self.thread = threading.Thread(target=self._run, name="dmd_jax-stop-signals", daemon=True)
    self.thread.start()

  def install(self) -> None:
    signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _ignore)
    if signal.getsignal(signal.SIGINT) in (signal.SIG_DFL, None):
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def _run(self) -> None:
    while True:
      data = os.read(self._read, 64)
      for signum in data:
        if signum in (signal.SIGTERM, signal.SIGINT):
          self.on_signal(signum)

  def on_signal(self, signum: int) -> None:
    name = signal.Signals(signum).name
    code = SIGTERM_EXIT_CODE if signum == signal.SIGTERM else SIGINT_EXIT_CODE
    with self.lock:
      first, self.pending = self.pending, self.pending or name
      preemption = self.preemption
    if first is not None:
      _exit_now(code, f"{name} while a {first} is pending (stuck in a collective or a save?)")
    if signum == signal.SIGINT:
      return                                  # KeyboardInterrupt in the main thread
    if preemption is None:
      _exit_now(code, "SIGTERM outside the training loop (nothing to checkpoint)")
    logging.warning("SIGTERM received: saving a checkpoint, then exiting (a second SIGTERM exits at once)")
    preemption.signalled = True


_WATCHER: _Watcher | None = None


def install() -> None:
  """Installs the stop-signal handling of the module docstring (main thread only; idempotent). Called by
  ``main`` first and by ``train.start_process`` again after ``distributed.maybe_initialize`` has initialised
  ``jax.distributed``, whose preemption notifier replaces the SIGTERM handler."""
  global _WATCHER
  if threading.current_thread() is not threading.main_thread():
    return
  if _WATCHER is None:
    _WATCHER = _Watcher()
  _WATCHER.install()


class Preemption:
  """SIGTERM (a preemption notice) during the training loop → finish the current step, save a checkpoint,
  exit with ``distributed.PREEMPTED_EXIT_CODE``; a second SIGTERM exits at once (module docstring). With
  several processes every one must save at the same step: the first process to see a SIGTERM publishes
  ``stop_at = its step + 2 max_steps_in_flight + 4`` in the coordination service's key-value store (first
  writer wins), and every process polls it each step. Hosts stay within ``max_steps_in_flight`` + 1 steps of
  each other (the steps' collectives pace them), so no process has passed ``stop_at`` when it reads it."""

  KEY = "dmd_jax/preemption/stop_at"

  def __init__(self, max_steps_in_flight: int, timeout_s: float | None = None):
    self.stop_margin = 2 * max_steps_in_flight + 4
    self.signalled = False
    self.stop_at = None
    self._call = None
    if jax.process_count() > 1:
      self._call = distributed.CoordinationCalls(
          distributed.collective_timeout_s() if timeout_s is None else timeout_s)
    install()
    if _WATCHER is not None:
      with _WATCHER.lock:
        _WATCHER.preemption = self

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (called by every process at every step)."""
    if jax.process_count() == 1:
      return self.signalled
    if self.stop_at is None:
      client = distributed.coordination_client()
      if self.signalled:
        try:
          self._call("a key-value write", client.key_value_set, self.KEY, str(step + self.stop_margin))
        except distributed.PeerUnresponsive:
          raise
        except Exception:   # another process published first: its value holds
          pass
      try:
        value = self._call("a key-value read", client.key_value_try_get, self.KEY)
      except distributed.PeerUnresponsive:
        raise
      except Exception:   # not published: no process has been signalled
        value = None
      if value:
        self.stop_at = int(value)
        logging.warning("preemption: every process saves and stops after step %d", self.stop_at)
    return self.stop_at is not None and step >= self.stop_at

  def restore(self):
    """The loop is over: a SIGTERM exits at once again."""
    if _WATCHER is not None:
      with _WATCHER.lock:
        if _WATCHER.preemption is self:
          _WATCHER.preemption = None
