"""The regression-pair store (docs/method.md §5): (noise, teacher ODE output) pairs written once, read back.

Layout under ``<workdir>/pairs/``: ``spec.json`` (what the set is: count, shard size, seed, sampler) and
``shard-00000.npz``, ... each holding ``index``, ``z``, ``x`` (and ``cond`` for conditional teachers).
Shards are written to a temporary name and renamed, so a killed run never leaves a partial shard that
looks complete; a rerun builds only the missing shards. The noise of pair i is a deterministic function
of (seed, i), so the set does not depend on how many devices or hosts built it, or in how many runs.
"""
from __future__ import annotations

import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmd_jax import io, sharding


class PairStore:
  """``what`` names the set in errors; ``config_names`` maps spec keys to the config fields they come from."""

  def __init__(self, directory: str, spec: dict, what: str = "regression pairs",
               config_names: dict[str, str] | None = None):
    self.directory = directory
    self.spec = dict(spec)
    self.what = what
    self.config_names = dict(config_names or {})
    self.num_pairs = int(spec["num_pairs"])
    self.shard_size = int(spec["shard_size"])
    if self.num_pairs <= 0 or self.shard_size <= 0:
      raise ValueError(f"regression pairs need num_pairs > 0 and shard_size > 0, got {spec}")
    self.num_shards = -(-self.num_pairs // self.shard_size)

  def open(self) -> "PairStore":
    """Creates the folder or checks that an existing one was built with the same spec; deletes the
    half-written shards a killed run of this process index left (never a live writer's)."""
    io.makedirs(self.directory)
    path = io.join(self.directory, "spec.json")
    if io.exists(path):
      old, new = io.read_json(path), json.loads(json.dumps(self.spec))
      if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        raise ValueError(
            f"the {self.what} in {self.directory} were built with a different spec; differing (on disk, config): "
            + ", ".join(f"{self.config_names.get(k, k)}={a!r}/{b!r}" for k, (a, b) in diff.items())
            + f"\nuse a new workdir or delete {self.directory} to rebuild them")
    elif jax.process_index() == 0:
      io.write_json(path, self.spec, sort_keys=True)
    io.remove_stale_temporaries(self.directory)
    return self

  def shard_path(self, i: int) -> str:
    return io.join(self.directory, f"shard-{i:05d}.npz")

  def shard_indices(self, i: int) -> np.ndarray:
    return np.arange(i * self.shard_size, min((i + 1) * self.shard_size, self.num_pairs))

  def missing_shards(self) -> list[int]:
    present = set(io.listdir(self.directory)) if io.isdir(self.directory) else set()   # one listing
    return [i for i in range(self.num_shards) if f"shard-{i:05d}.npz" not in present]

  def write_shard(self, i: int, arrays: dict[str, np.ndarray]) -> None:
    io.write_npz(self.shard_path(i), **arrays)

  def _check_complete(self) -> None:
    missing = self.missing_shards()
    if missing:
      raise FileNotFoundError(
          f"{len(missing)} of {self.num_shards} regression-pair shards are missing in {self.directory} "
          f"(first: {self.shard_path(missing[0])}); run --mode=pairs")

  def rows(self) -> "PairRows":
    """The complete set, read row by row (:class:`PairRows`)."""
    self._check_complete()
    return PairRows(self)

  def load(self) -> dict[str, np.ndarray]:
    """The complete set in memory (small sets and tests; training reads rows through :meth:`rows`)."""
    index = np.arange(self.num_pairs)
    return {"index": index, **self.rows().take(index)}


class PairRows:
  """The regression set read row by row (docs/multihost.md): every shard memory-mapped
  (``io.npz_memmap``), so ``take(indices)`` reads only those rows — each process reads the rows of the
  global batches it feeds, never the whole set (SD's 500k pairs are ~65 GB of float32 latents)."""

  def __init__(self, store: "PairStore"):
    self.store = store
    self._maps = [io.npz_memmap(store.shard_path(i)) for i in range(store.num_shards)]
    self.fields = tuple(k for k in self._maps[0] if k != "index")
    index = np.concatenate([np.asarray(m["index"]) for m in self._maps])
    if not np.array_equal(index, np.arange(store.num_pairs)):
      raise ValueError(f"the regression pairs in {store.directory} are not the indices 0..{store.num_pairs - 1}")

  def __len__(self) -> int:
    return self.store.num_pairs

  def take(self, indices) -> dict[str, np.ndarray]:
    """``{field: rows}`` of the pairs ``indices`` (any order, repeats allowed)."""
    idx = np.asarray(indices, np.int64)
    shard, offset = np.divmod(idx, self.store.shard_size)
    out = {}
    for k in self.fields:
      first = self._maps[0][k]
      arr = np.empty((len(idx),) + first.shape[1:], first.dtype)
      for s in np.unique(shard):
        m = shard == s
        arr[m] = self._maps[int(s)][k][offset[m]]
      out[k] = arr
    return out


def pair_noise(key, indices, shape) -> jax.Array:
  """``z_i = N(0, I)`` drawn from ``fold_in(key, i)`` (``key``: the ``'pairs'`` stream): the same for pair i
  however it is batched."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
      jnp.asarray(indices, jnp.uint32))


def build_pairs(store: PairStore, sample_fn: Callable, mesh, key, sample_shape: tuple, conditions) -> None:
  """Builds every missing shard. Every process runs the same programs in the same order: shard i's pairs are
  one global batch over the whole mesh (padded to the device count), each process feeding its own rows of
  the noise and conditions; the outputs are gathered and process 0 writes the shard (docs/multihost.md).

  ``sample_fn(z, cond) -> x`` is the teacher's ODE sampler (jitted here); ``key`` the noise stream;
  ``conditions`` the teacher's (``families.base.Conditions``): ``for_pairs(indices)`` gives each pair's
  stored condition id, ``lookup(ids)`` what ``sample_fn`` takes (a label, a prompt embedding).
  """
  # every process lists the folder between two barriers: the same list, before any shard is written
  sharding.barrier("pairs: list the missing shards")
  todo = store.missing_shards()
  sharding.barrier("pairs: missing shards listed")
  if not todo:
    return
  n_dev = mesh.devices.size
  batch = sharding.batch_sharding(mesh)
  sample = jax.jit(sample_fn, out_shardings=batch)
  logging.info("building %d regression-pair shards of %d pairs in %s", len(todo), store.shard_size,
               store.directory)
  t0 = time.time()
  for done, i in enumerate(todo, 1):
    idx = store.shard_indices(i)
    padded = np.concatenate([idx, np.full((-len(idx)) % n_dev, idx[-1])])   # pad to the device count
    rows = padded[sharding.process_slice(len(padded))]                        # this process's rows
    local = {"z": np.asarray(pair_noise(key, rows, sample_shape)),
             "cond": np.asarray(conditions.lookup(conditions.for_pairs(rows)))}
    g = sharding.global_batch(mesh, local, len(padded))
    with jax.set_mesh(mesh):   # traced under the mesh: activation sharding, TPU flash attention
      x = sample(g["z"], g["cond"])
    x = sharding.gather(x)[:len(idx)]
    if jax.process_index() == 0:
      store.write_shard(i, {"index": idx, "z": np.asarray(pair_noise(key, idx, sample_shape)), "x": x,
                            "cond": np.asarray(conditions.for_pairs(idx))})
    el = time.time() - t0
    logging.info("pairs: shard %d/%d written (%.1f pairs/s, ETA %.0f s)", done, len(todo),
                 done * store.shard_size / el, el / done * (len(todo) - done))


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
