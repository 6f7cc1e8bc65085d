"""Multi-process plumbing (docs/multihost.md): ``jax.distributed`` initialisation, the timeout of XLA:CPU's
collectives, barriers, calls to the coordination service with a deadline, the explanation of a failed
collective, and the exit code of a preempted run.

Nothing here touches signal handling: ``jax.distributed.initialize`` replaces the SIGTERM handler, and whoever
starts the process (``train.start_process``) installs ``preemption.install`` again after
:func:`maybe_initialize`.
"""
from __future__ import annotations

import os
import queue
import threading

import jax
from absl import logging
from jax._src import distributed as jax_distributed   # the coordination service's client: no public API
from jax.experimental import multihost_utils

# The exit code of a run stopped by SIGTERM after saving its checkpoint (a preemption): launchers restart on it.
PREEMPTED_EXIT_CODE = 42

COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300


def maybe_initialize(enabled: bool | None = None, heartbeat_timeout_s: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` on a multi-process job; returns whether it did.

  The process learns its place from the environment: ``JAX_COORDINATOR_ADDRESS=host:port`` with
  ``DMD_JAX_NUM_PROCESSES`` and ``DMD_JAX_PROCESS_ID`` (set by ``launch/local.py`` and any launcher that
  knows them), else JAX's own cluster detection (Cloud TPU pods, SLURM, GKE). ``enabled=True`` forces the
  call (config ``distributed='yes'``), ``False`` never makes it, ``None`` makes it when the environment
  describes a cluster. A peer that stops sending heartbeats for ``heartbeat_timeout_s`` (default
  ``DMD_JAX_HEARTBEAT_TIMEOUT_S`` or 100) ends the others with an error instead of a hang, and so does a
  collective that waits longer than ``DMD_JAX_COLLECTIVE_TIMEOUT_S`` (default 300) on XLA:CPU
  (:func:`add_collective_timeout`). When it returns True, JAX's preemption notifier has replaced the SIGTERM
  handler: the caller installs its own again (``preemption.install``).
  """
  if enabled is False or jax.distributed.is_initialized():
    return False
  env = os.environ
  explicit = {}
  for name, key in (("num_processes", "DMD_JAX_NUM_PROCESSES"), ("process_id", "DMD_JAX_PROCESS_ID")):
    if env.get(key, "") != "":
      try:
        explicit[name] = int(env[key])
      except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None
  if len(explicit) == 1:
    raise ValueError("set both DMD_JAX_NUM_PROCESSES and DMD_JAX_PROCESS_ID, or neither")
  if explicit and not env.get("JAX_COORDINATOR_ADDRESS"):
    raise ValueError("DMD_JAX_NUM_PROCESSES / DMD_JAX_PROCESS_ID need JAX_COORDINATOR_ADDRESS=host:port")
  if explicit and not 0 <= explicit["process_id"] < explicit["num_processes"]:
    raise ValueError(f"DMD_JAX_PROCESS_ID={explicit['process_id']} is not in [0, "
                     f"DMD_JAX_NUM_PROCESSES={explicit['num_processes']})")
  cluster = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
             or "," in env.get("TPU_WORKER_HOSTNAMES", "")
             or int(env.get("SLURM_NTASKS", "1")) > 1)
  if heartbeat_timeout_s is None:
    heartbeat_timeout_s = int(env.get("DMD_JAX_HEARTBEAT_TIMEOUT_S", "100"))
  if not (enabled or cluster):
    return False
  timeout = add_collective_timeout(env)
  jax.distributed.initialize(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
                             heartbeat_timeout_seconds=heartbeat_timeout_s, **explicit)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices; XLA:CPU collectives "
               "time out after %s s", jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), timeout)
  return True


def collective_timeout_s(env=os.environ) -> float:
  """The timeout in effect for collectives (and the calls to the coordination service that
  :class:`CoordinationCalls` waits for): ``--xla_cpu_collective_timeout_seconds`` in ``XLA_FLAGS``, else
  ``DMD_JAX_COLLECTIVE_TIMEOUT_S``, else 300."""
  for f in env.get("XLA_FLAGS", "").split():
    if f.startswith(COLLECTIVE_TIMEOUT_FLAG + "="):
      try:
        return float(f.split("=", 1)[1])
      except ValueError:
        break
  raw = env.get("DMD_JAX_COLLECTIVE_TIMEOUT_S", "")
  try:
    timeout = int(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT_S
  except ValueError:
    raise ValueError(f"DMD_JAX_COLLECTIVE_TIMEOUT_S={raw!r} is not an integer number of seconds") from None
  if timeout <= 0:
    raise ValueError(f"DMD_JAX_COLLECTIVE_TIMEOUT_S={raw!r} must be > 0")
  return timeout


def add_collective_timeout(env=os.environ) -> int | str:
  """Appends ``--xla_cpu_collective_timeout_seconds=DMD_JAX_COLLECTIVE_TIMEOUT_S`` (default 300) to
  ``env['XLA_FLAGS']`` unless the flag is already there (the user's value is kept), and returns the timeout
  in effect. XLA reads ``XLA_FLAGS`` when the backend starts, so this works only before the first JAX
  computation (as ``jax.distributed.initialize`` must come first anyway). XLA:CPU's default is 30 minutes:
  a peer that is alive but stuck (stopped, deadlocked) would hold every other process in its gloo collective
  that long. The flag bounds XLA:CPU's collectives only (GPU / TPU: docs/multihost.md), so it is added only
  when ``JAX_PLATFORMS`` is ``cpu`` (as ``launch/local.py`` sets it): an accelerator's XLA build is not handed
  a CPU flag it was never tested with."""
  if env.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
    return "XLA's default (not a CPU-only run)"
  flags = env.get("XLA_FLAGS", "").split()
  for f in flags:
    if f.startswith(COLLECTIVE_TIMEOUT_FLAG + "="):
      return f.split("=", 1)[1]
  timeout = int(collective_timeout_s(env))
  env["XLA_FLAGS"] = " ".join(flags + [f"{COLLECTIVE_TIMEOUT_FLAG}={timeout}"])
  return timeout


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing with one process). Every process must
  call the same barriers in the same order: a process that lists a folder, writes a file or decides between
  two code paths puts a barrier before and after, so all see the same state (docs/multihost.md)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class PeerUnresponsive(RuntimeError):
  """The coordination service (hosted by process 0) did not answer in time: process 0 is stuck or gone."""


def coordination_client():
  """The client of ``jax.distributed``'s coordination service (its key-value store); None before
  :func:`maybe_initialize`."""
  return jax_distributed.global_state.client


class CoordinationCalls:
  """Runs calls on a daemon thread and waits for each at most ``timeout_s``: the coordination service's
  client has no deadline of its own, and a stopped process 0 (which hosts the service) would otherwise hold
  the caller forever. A daemon thread (not a ThreadPoolExecutor, whose threads are joined at exit) so that
  a call stuck for good does not hold the exit."""

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self._requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._serve, name="dmd_jax-coordination-calls", daemon=True).start()

  def _serve(self) -> None:
    while True:
      fn, args, box, done = self._requests.get()
      try:
        box.append((True, fn(*args)))
      except Exception as e:   # pylint: disable=broad-except  (handed to the caller)
        box.append((False, e))
      done.set()

  def __call__(self, what: str, fn, *args):
    box, done = [], threading.Event()
    self._requests.put((fn, args, box, done))
    if not done.wait(self.timeout_s):
      raise PeerUnresponsive(
          f"the coordination service (process 0) did not answer {what} within {self.timeout_s:g} s "
          f"(DMD_JAX_COLLECTIVE_TIMEOUT_S): process 0 is stuck, stopped or gone; its log says why. Rerun the "
          f"same command to resume from the last checkpoint")
    ok, value = box[0]
    if not ok:
      raise value
    return value


def explain_failure(e: BaseException) -> str | None:
  """A one-line explanation when ``e`` is a cross-process failure: the coordination service did not answer
  (:class:`PeerUnresponsive`, its own message) or a collective failed or timed out; else None."""
  if isinstance(e, PeerUnresponsive):
    return str(e)
  text = str(e)
  if "Gloo" not in text and "collective" not in text.lower():
    return None
  why = "timed out" if "timed out" in text.lower() else "failed"
  try:
    timeout = f"{collective_timeout_s():g}"
  except ValueError:
    timeout = "?"
  return (f"a collective across processes {why}: another process is stuck, stopped or gone (its log says why; "
          f"XLA:CPU collectives wait at most {timeout} s, DMD_JAX_COLLECTIVE_TIMEOUT_S). "
          f"Rerun the same command to resume from the last checkpoint. ({text.splitlines()[0][:300]})")
