"""Meshes, sharding rules and multi-host input (the multi-process plumbing itself: ``distributed.py``).

The mesh has axes ``('data', 'fsdp')``. Batches are sharded over both axes along their leading dimension.
Parameters and optimizer state (the teacher's too) are sharded FSDP-style: an array with at least
``min_shard_size`` elements is split over ``'fsdp'`` along its largest dimension divisible by the fsdp
size; smaller arrays are replicated.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


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
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
