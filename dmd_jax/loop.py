"""The one training loop: a step function run from ``start`` to ``total`` with its periodic actions.

Every fit in the project goes through :func:`run` — the distiller (``train.py``), the EDM teacher trainer
(``teacher_train.py``) and the digits classifier (``evaluation/digits.py``) — and every long host job (regression
pairs, real latents, prompt embeddings, text-to-image evaluation) reports through :class:`Progress`, the one place
that computes a rate and an ETA.

What :func:`run` does after each step, in order:

1. bounds the dispatch queue: it keeps the metrics of at most ``max_in_flight`` steps that have been dispatched
   but not read back, and hands the oldest to ``on_retired`` (read on the host, which waits for that step);
2. every ``log_every`` steps and at the last: the step's metrics (``prepare_metrics`` may merge or check
   them), read to floats, plus ``steps_per_sec``, to the writer and the log line ``<what> step i/n  (x steps/s,
   ETA s)``;
3. its ``actions`` whose ``every`` divides the step (evaluations, callbacks); their time is not counted in
   the rate or in ``train_seconds``;
4. a checkpoint every ``checkpoint_every`` steps, at ``total``, and when a SIGTERM asked every process to stop
   (:class:`dmd_jax.preemption.Preemption`); after that stop's save it raises ``Preempted``;
5. ``on_step(step)``.

It knows no network, method or data: it sits at the bottom of the layers (docs/architecture.md), beside the
preemption handling it uses.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging

from dmd_jax.preemption import Preempted, Preemption

# The most dispatched steps whose metrics have not been read back: enough to hide the host's work behind the
# devices'. JAX dispatches asynchronously; unbounded, the host runs ahead queueing steps and their batches (two
# processes on XLA:CPU hung in a gloo all-reduce once ~100 steps were queued, docs/multihost.md), and a
# SIGTERM's agreed stop step (dmd_jax/preemption.py) would be far ahead of the last finished one.
MAX_STEPS_IN_FLIGHT = 4


class Progress:
  """``<what> i/n <unit>  [detail]  (<rate> <unit>/s, ETA <s> s)`` log lines for a job of ``total`` items (the
  count's unit left out with ``count_unit=False``: ``train step 20/60  (2.3 steps/s, ETA 17 s)``).

  The rate is over the items done since this object was made (or since ``start``), with ``paused`` time
  excluded (:meth:`pause`): it is what the remaining items should take.
  """

  def __init__(self, what: str, total: int, unit: str = "steps", start: int = 0, count_unit: bool = True):
    self.what, self.total, self.unit, self.count_unit = what, int(total), unit, count_unit
    self._t0 = self._last_t = time.perf_counter()
    self._start = self._last_done = int(start)
    self._paused = 0.0

  def pause(self, seconds: float) -> None:
    """Excludes ``seconds`` (e.g. a periodic evaluation) from the rates."""
    self._paused += seconds
    self._last_t += seconds

  @property
  def seconds(self) -> float:
    """Seconds since the start, less the paused ones."""
    return time.perf_counter() - self._t0 - self._paused

  def rate(self) -> float:
    """Items per second since the start."""
    return (self._last_done - self._start) / max(self.seconds, 1e-9)

  def update(self, done: int, detail: str = "") -> float:
    """Records that ``done`` items are done, logs the line and returns the rate since the previous update
    (items per second)."""
    now = time.perf_counter()
    rate = (done - self._last_done) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_done = now, int(done)
    overall = self.rate()
    eta = (self.total - done) / overall if overall > 0 else float("inf")
    logging.info("%s %d/%d%s%s  (%.1f %s/s, ETA %.0f s)", self.what, done, self.total,
                 f" {self.unit}" if self.count_unit else "", f"  {detail}" if detail else "", rate, self.unit, eta)
    return rate


@dataclasses.dataclass
class Action:
  """A periodic action of :func:`run`: ``fn(step, state, train_seconds)`` after every step that ``every``
  divides (and before ``total``); 0 never. ``train_seconds``: the loop's time so far, less the actions'. Its
  own time is excluded from the rate and from ``train_seconds``."""
  every: int
  fn: Callable[[int, Any, float], None]


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  train_seconds: float       # the loop's time, less the actions'
  last_metrics: dict         # the last logged metrics ({'step': ..., ...}); {} when none were logged


def run(step_fn: Callable[[Any, int], tuple[Any, Mapping[str, Any]]], state, *, start: int, total: int,
        what: str = "train", log_every: int = 100, writer=None, log_keys: Sequence[str] = (),
        prepare_metrics: Callable[[int, Mapping[str, Any]], Mapping[str, Any]] | None = None,
        on_retired: Callable[[Mapping[str, Any]], None] | None = None,
        actions: Sequence[Action] = (), checkpointer=None, checkpoint_every: int = 0,
        meta: Callable[[int], dict] | None = None, on_step: Callable[[int], None] | None = None,
        max_in_flight: int = MAX_STEPS_IN_FLIGHT, preemptible: bool = True) -> Result:
  """Runs ``state, metrics = step_fn(state, step)`` for ``step = start .. total-1`` with the periodic work of
  the module docstring. ``log_keys``: metrics shown on the progress line. ``checkpointer``: a
  ``dmd_jax.checkpoint.Checkpointer`` (None: no checkpoints); ``meta(step)`` its JSON metadata.
  ``on_step(step)``: called last after every step, its checkpoint included (tests interrupt a fit with it).
  ``preemptible``: agree a stop step on SIGTERM across processes (needs the same loop on every process)."""
  progress = Progress(f"{what} step", total, "steps", start, count_unit=False)
  preemption = Preemption(max_in_flight) if preemptible else None
  in_flight: collections.deque = collections.deque()
  last_metrics: dict = {}
  step = start
  try:
    while step < total:
      state, metrics = step_fn(state, step)
      step += 1
      in_flight.append(metrics)
      if len(in_flight) > max_in_flight:
        retired = in_flight.popleft()
        if on_retired is not None:
          on_retired(retired)
        else:
          jax.block_until_ready(retired)
      if step % log_every == 0 or step == total:
        if prepare_metrics is not None:
          metrics = prepare_metrics(step, metrics)
        metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        detail = "  ".join(f"{k} {metrics[k]:.4g}" for k in log_keys if k in metrics)
        metrics["steps_per_sec"] = progress.update(step, detail)
        if writer is not None:
          writer.write_scalars(step, metrics)
        last_metrics = {"step": step, **metrics}
      for action in actions:
        if action.every and step % action.every == 0 and step < total:
          t = time.perf_counter()
          action.fn(step, state, progress.seconds)
          progress.pause(time.perf_counter() - t)
      stop = preemption is not None and preemption.should_stop(step)
      if checkpointer is not None and (
          (checkpoint_every and step % checkpoint_every == 0) or step == total or stop):
        checkpointer.save(step, state, meta(step) if meta is not None else {"step": step})
      if stop and step < total:
        if checkpointer is not None:
          checkpointer.wait()
          logging.warning("stopped by SIGTERM at step %d; rerun the same command to resume", step)
          raise Preempted(f"preempted: the checkpoint of step {step} is saved in {checkpointer.directory}; "
                          "rerun to resume")
        raise Preempted(f"preempted after {what} step {step} (nothing saved)")
      if on_step is not None:
        on_step(step)
  finally:
    if preemption is not None:
      preemption.restore()
    if checkpointer is not None:
      checkpointer.wait()
  return Result(state, step, progress.seconds, last_metrics)
