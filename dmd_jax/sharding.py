"""Meshes, sharding rules and multi-host input.

The mesh has axes ``('data', 'fsdp')``. Batches are sharded over both axes along their leading dimension.
Parameters and optimizer state (the teacher's too) are sharded FSDP-style: an array with at least
``min_shard_size`` elements is split over ``'fsdp'`` along its largest dimension divisible by the fsdp
size; smaller arrays are replicated.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


# The exit code of a run stopped by SIGTERM after saving its checkpoint (a preemption): launchers restart on it.
PREEMPTED_EXIT_CODE = 42


def maybe_initialize_distributed(enabled: bool | None = None, heartbeat_timeout_s: int | None = None) -> None:
  """Calls ``jax.distributed.initialize`` on a multi-process job (docs/multihost.md).

  The process learns its place from the environment: ``JAX_COORDINATOR_ADDRESS=host:port`` with
  ``DMD_JAX_NUM_PROCESSES`` and ``DMD_JAX_PROCESS_ID`` (set by ``launch/local.py`` and any launcher that
  knows them), else JAX's own cluster detection (Cloud TPU pods, SLURM, GKE). ``enabled=True`` forces the
  call (config ``distributed='yes'``), ``False`` never makes it, ``None`` makes it when the environment
  describes a cluster. A peer that stops sending heartbeats for ``heartbeat_timeout_s`` (default
  ``DMD_JAX_HEARTBEAT_TIMEOUT_S`` or 100) ends the others with an error instead of a hang, and so does a
  collective that waits longer than ``DMD_JAX_COLLECTIVE_TIMEOUT_S`` (default 300) on XLA:CPU
  (:func:`add_collective_timeout`). The stop-signal handling (``preemption.install``) is installed again
  afterwards: JAX's preemption notifier replaces the SIGTERM handler.
  """
  if enabled is False or jax.distributed.is_initialized():
    return
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
  if enabled or cluster:
    timeout = add_collective_timeout(env)
    jax.distributed.initialize(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
                               heartbeat_timeout_seconds=heartbeat_timeout_s, **explicit)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices; XLA:CPU collectives "
                 "time out after %s s", jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), timeout)
    from dmd_jax import preemption
    preemption.install()


COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300


def collective_timeout_s(env=os.environ) -> float:
  """The timeout in effect for collectives (and the calls to the coordination service that
  ``preemption.Preemption`` waits for): ``--xla_cpu_collective_timeout_seconds`` in ``XLA_FLAGS``, else
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


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over all devices; one of the sizes may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  elif fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != n:
    raise ValueError(f"mesh.data × mesh.fsdp must equal the number of devices ({n}); "
                     f"got data={data}, fsdp={fsdp}")
  return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_shards_in_scope():
  """``(mesh, n)``: the mesh in scope (``jax.set_mesh``, possibly empty) and how many ways its batch axes split a
  batch; ``n`` is None with no mesh, inside ``shard_map`` (manual axes) or when the mesh lacks the batch axes.
  What ``constrain_batch`` and the splash kernel's placement (``models/attention.py``) decide by."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes or not set(BATCH_AXES) <= set(mesh.axis_names):
    return mesh, None
  return mesh, int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def constrain_batch(x):
  """Activation sharding: ``x`` split along its leading (batch) dimension over the batch axes of the mesh in
  scope (``with jax.set_mesh(mesh)`` around the lowering, as ``train.py`` and ``dmd_jax.plan`` do), every other
  dimension whole. The networks call it at their block boundaries so that the partitioner never follows an
  FSDP-sharded weight into splitting heads or channels of an activation over ``'fsdp'`` (docs/benchmarks.md:
  SD 1.5's generator step on 32 devices did 3.6× the flops that way); weights are gathered instead.
  The identity without such a mesh (or with one device), inside ``shard_map`` and for a batch that does not
  divide over the devices."""
  _, n = batch_shards_in_scope()
  if n is None or n == 1 or not getattr(x, "ndim", 0) or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_shard_size: int) -> P:
  """The partition spec of one parameter-like array under the FSDP rule above."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in dims:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def tree_sharding(mesh: Mesh, tree: Any, min_shard_size: int = 2 ** 18) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) under the FSDP rule."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_shard_size)), tree)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
  """Assembles per-process rows into global arrays sharded over the batch axes.

  Each process passes its own contiguous slice of the global batch (``process_slice``).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
          for k, v in local.items()}


def gather(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host) global array on every process, as NumPy. ``jax.device_get`` only
  works for arrays whose shards this process holds."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing with one process). Every process must
  call the same barriers in the same order: a process that lists a folder, writes a file or decides between
  two code paths puts a barrier before and after, so all see the same state (docs/multihost.md)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_share(n: int) -> slice:
  """This process's contiguous share of ``n`` host-side items that every process holds (``np.array_split``
  sizes: they differ by at most one), for work that each process does on its own part and then gathers
  (FID features)."""
  p, i = jax.process_count(), jax.process_index()
  bounds = np.cumsum([0] + [n // p + (k < n % p) for k in range(p)])
  return slice(int(bounds[i]), int(bounds[i + 1]))


def process_slice(global_batch_size: int) -> slice:
  """Rows of the global batch that this process loads."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the {n} processes")
  per = global_batch_size // n
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def frozen_sharding(mesh: Mesh, frozen: dict, min_shard_size: int = 2 ** 18) -> dict:
  """Shardings of the frozen parameters: the teacher (``frozen['teacher']``) FSDP-sharded like the trainable
  state (``tree_sharding``); everything else (LPIPS-VGG16, SD's VAE — 375 MB together) replicated. Their
  convolutions run on large per-sample activations (512 px images), and with sharded weights the partitioner
  reshards activations instead of gathering weights: SD1.5's generator step on 8 devices then did 2× the
  VAE's flops and 4× its temporary memory (bench/sd_memory.py)."""
  return {k: (tree_sharding(mesh, v, min_shard_size) if k == "teacher"
              else jax.tree.map(lambda _: replicated(mesh), v)) for k, v in frozen.items()}
