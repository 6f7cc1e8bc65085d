"""The regression-pair store (method.md §5): (noise, teacher ODE output) pairs written once, read back.

Layout under ``<workdir>/pairs/``: ``spec.json`` (what the set is: count, shard size, seed, sampler) and
``shard-00000.npz``, ... each holding ``index``, ``z``, ``x`` (and ``cond`` for conditional teachers).
Shards are written to a temporary name and renamed, so a killed run never leaves a partial shard that
looks complete; a rerun builds only the missing shards. The noise of pair i is a deterministic function
of (seed, i), so the set does not depend on how many devices or hosts built it, or in how many runs.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmd_jax import sharding


class PairStore:
  def __init__(self, directory: str, spec: dict):
    self.directory = directory
    self.spec = dict(spec)
    self.num_pairs = int(spec["num_pairs"])
    self.shard_size = int(spec["shard_size"])
    if self.num_pairs <= 0 or self.shard_size <= 0:
      raise ValueError(f"regression pairs need num_pairs > 0 and shard_size > 0, got {spec}")
    self.num_shards = -(-self.num_pairs // self.shard_size)

  def open(self) -> "PairStore":
    """Creates the folder or checks that an existing one was built with the same spec."""
    os.makedirs(self.directory, exist_ok=True)
    path = os.path.join(self.directory, "spec.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old != json.loads(json.dumps(self.spec)):
        raise ValueError(
            f"the regression pairs in {self.directory} were built with a different spec:\n  on disk: {old}\n"
            f"  config:  {self.spec}\nuse a new workdir or delete that folder to rebuild them")
    elif jax.process_index() == 0:
      _atomic_write_json(path, self.spec)
    self._remove_stale_temporaries()
    return self

  def _tmp_prefix(self) -> str:
    return f".tmp-p{jax.process_index()}-"

  def _remove_stale_temporaries(self) -> None:
    """Deletes half-written shards left by a killed run of this process index (never a live writer's)."""
    for name in os.listdir(self.directory):
      if self._tmp_prefix() in name and not name.endswith(f"{self._tmp_prefix()}{os.getpid()}"):
        os.remove(os.path.join(self.directory, name))

  def shard_path(self, i: int) -> str:
    return os.path.join(self.directory, f"shard-{i:05d}.npz")

  def shard_indices(self, i: int) -> np.ndarray:
    return np.arange(i * self.shard_size, min((i + 1) * self.shard_size, self.num_pairs))

  def missing_shards(self) -> list[int]:
    return [i for i in range(self.num_shards) if not os.path.exists(self.shard_path(i))]

  def write_shard(self, i: int, arrays: dict[str, np.ndarray]) -> None:
    path = self.shard_path(i)
    tmp = f"{path}{self._tmp_prefix()}{os.getpid()}"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)

  def load(self) -> dict[str, np.ndarray]:
    missing = self.missing_shards()
    if missing:
      raise FileNotFoundError(
          f"{len(missing)} of {self.num_shards} regression-pair shards are missing in {self.directory} "
          f"(first: {self.shard_path(missing[0])}); run --mode=pairs")
    parts = []
    for i in range(self.num_shards):
      with np.load(self.shard_path(i)) as f:
        parts.append({k: f[k] for k in f.files})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not np.array_equal(out["index"], np.arange(self.num_pairs)):
      raise ValueError(f"the regression pairs in {self.directory} are not the indices 0..{self.num_pairs - 1}")
    return out


def _atomic_write_json(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def pair_noise(seed: int, indices, shape) -> jax.Array:
  """``z_i = N(0, I)`` drawn from ``fold_in(key(seed), i)``: the same for pair i however it is batched."""
  key = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(
      jnp.asarray(indices, jnp.uint32))


def pair_labels(seed: int, indices, num_classes: int) -> jax.Array:
  """Class label of pair i, uniform in [0, num_classes), drawn from ``fold_in(key(seed), i)``."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x6C61626C)   # a stream apart from the noise
  return jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes))(
      jnp.asarray(indices, jnp.uint32))


def build_pairs(store: PairStore, sample_fn: Callable, mesh, seed: int, sample_shape: tuple,
                cond_fn: Callable | None = None, cond_input_fn: Callable | None = None) -> None:
  """Builds every missing shard: each process takes shards i with ``i % process_count == process_index``,
  each shard's batch sharded over all of that process's devices.

  ``sample_fn(z, cond) -> x`` is the teacher's ODE sampler (jitted here); ``cond_fn(indices) -> cond``
  gives the deterministic condition of each pair (None for unconditional teachers), stored as the pair's
  ``cond``; ``cond_input_fn(cond)`` (host), when given, turns it into what ``sample_fn`` takes (e.g. a prompt
  id into its text embedding).
  """
  todo = [i for i in store.missing_shards() if i % jax.process_count() == jax.process_index()]
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
    z = jax.device_put(pair_noise(seed, padded, sample_shape), batch)
    cond = None if cond_fn is None else np.asarray(cond_fn(padded))
    cond_in = None if cond is None else jax.device_put(
        cond if cond_input_fn is None else cond_input_fn(cond), batch)
    x = np.asarray(jax.device_get(sample(z, cond_in)))[:len(idx)]
    arrays = {"index": idx, "z": np.asarray(z)[:len(idx)], "x": x}
    if cond is not None:
      arrays["cond"] = cond[:len(idx)]
    store.write_shard(i, arrays)
    el = time.time() - t0
    logging.info("pairs: shard %d/%d written (%.1f pairs/s, ETA %.0f s)", done, len(todo),
                 done * store.shard_size / el, el / done * (len(todo) - done))


class EpochSampler:
  """Deterministic batches of pair indices: epoch e is a permutation drawn from (seed, e), and step s
  takes the next ``batch_size`` positions — so the data order after a resume is the same."""

  def __init__(self, num_items: int, batch_size: int, seed: int):
    self.n, self.b, self.seed = num_items, batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch):
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    pos = step * self.b + np.arange(self.b)
    epochs, offs = np.divmod(pos, self.n)
    out = np.empty(self.b, np.int64)
    for e in np.unique(epochs):
      m = epochs == e
      out[m] = self._perm(int(e))[offs[m]]
    return out
