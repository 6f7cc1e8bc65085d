"""The regression-pair store (docs/method.md §5): (noise, teacher ODE output) pairs written once, read back.

Layout under ``<workdir>/pairs/``: ``spec.json`` (what the set is: count, shard size, seed, sampler, and the
shard format) and, for shard ``i``, one ``.npy`` file per array: ``shard-00000.index.npy``,
``shard-00000.z.npy``, ``shard-00000.x.npy`` and ``shard-00000.cond.npy`` (the real-latent store,
``data/real.py``, holds ``index`` and ``x``). Each file is written to a temporary name and renamed
(``io.atomic_write``), ``index`` last: a shard counts once its ``index`` file is there, so a killed run — or one
whose disk filled up (every write error raises: ``io.write_npy``) — never leaves a partial shard that looks
complete, and a rerun builds only the missing shards. Reading memory-maps the
files (``np.load(mmap_mode='r')``; a ``gs://`` file from its local copy, ``io.local_copy``), and each file's
length is checked against the shard's, so a damaged file is an error naming it, never a shard's stand-in.

A store of earlier versions (one ``.npz`` a shard; its ``spec.json`` names no shard format) counts as not
built: it is rebuilt in this layout, its ``.npz`` shards deleted, with a warning in the log.

The noise of pair i is a deterministic function of (seed, i), so the set does not depend on how many devices
or hosts built it, or in how many runs.
"""
from __future__ import annotations

import json
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmd_jax import distributed, io, sharding
from dmd_jax.loop import Progress

SHARD_FORMAT = "npy"      # spec.json's 'shard_format': one .npy file per array of a shard
_OLD_SHARD = re.compile(r"^shard-\d{5}\.npz$")
_FIELD = re.compile(r"^[A-Za-z0-9_]+$")


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
    """Creates the folder or checks that an existing one was built with the same spec (a store in the ``.npz``
    layout of earlier versions is rebuilt); deletes the half-written files a killed run of this process index
    left (never a live writer's)."""
    io.makedirs(self.directory)
    path = io.join(self.directory, "spec.json")
    new = json.loads(json.dumps(self.spec))
    old = io.read_json(path) if io.exists(path) else None
    if old is not None and old.get("shard_format") != SHARD_FORMAT:
      logging.warning("the %s in %s were written in the .npz layout of earlier versions: rebuilding them as .npy "
                      "shards", self.what, self.directory)
      if jax.process_index() == 0:
        for name in io.listdir(self.directory):
          if _OLD_SHARD.match(name):
            io.remove(io.join(self.directory, name))
      old = None
    if old is not None:
      old.pop("shard_format")
      if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        raise ValueError(
            f"the {self.what} in {self.directory} were built with a different spec; differing (on disk, config): "
            + ", ".join(f"{self.config_names.get(k, k)}={a!r}/{b!r}" for k, (a, b) in diff.items())
            + f"\nuse a new workdir or delete {self.directory} to rebuild them")
    elif jax.process_index() == 0:
      io.write_json(path, {**new, "shard_format": SHARD_FORMAT}, sort_keys=True)
    io.remove_stale_temporaries(self.directory)
    return self

  def shard_path(self, i: int, field: str = "index") -> str:
    """The file of array ``field`` of shard ``i`` (``index``: the one whose presence completes the shard)."""
    return io.join(self.directory, f"shard-{i:05d}.{field}.npy")

  def shard_indices(self, i: int) -> np.ndarray:
    return np.arange(i * self.shard_size, min((i + 1) * self.shard_size, self.num_pairs))

  def missing_shards(self) -> list[int]:
    present = set(io.listdir(self.directory)) if io.isdir(self.directory) else set()   # one listing
    return [i for i in range(self.num_shards) if f"shard-{i:05d}.index.npy" not in present]

  def write_shard(self, i: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes shard ``i``'s arrays (``index`` among them), each atomically, ``index`` last."""
    if "index" not in arrays or not all(_FIELD.match(k) for k in arrays):
      raise ValueError(f"a shard needs an 'index' array and field names of letters, digits and '_', "
                       f"got {sorted(arrays)}")
    for k in sorted(arrays, key=lambda k: k == "index"):
      try:
        io.write_npy(self.shard_path(i, k), arrays[k])
      except OSError as e:   # a full disk, a quota: the shard stays incomplete (no index) and is rebuilt
        msg = (f"writing shard {i} of the {self.what} failed at {self.shard_path(i, k)} ({e.strerror or e}); the "
               "shard has no index file, so it counts as missing and the next run rebuilds it: free space and rerun")
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e

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


def _map(path: str, rows: int) -> np.memmap:
  """The ``.npy`` file ``path`` memory-mapped read-only, checked to hold ``rows`` rows."""
  try:
    arr = io.load_npy(io.local_copy(path), mmap=True)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to rebuild its shard") from e
  if arr.ndim == 0 or len(arr) != rows:
    raise ValueError(f"{path} holds {arr.shape} rows, not the shard's {rows}; delete it to rebuild its shard")
  return arr


class PairRows:
  """The regression set read row by row (docs/multihost.md): every shard's arrays memory-mapped, so
  ``take(indices)`` reads only those rows — each process reads the rows of the global batches it feeds,
  never the whole set (SD's 500k pairs are ~65 GB of float32 latents)."""

  def __init__(self, store: "PairStore"):
    self.store = store
    names = io.listdir(store.directory)
    first = re.compile(r"^shard-00000\.([A-Za-z0-9_]+)\.npy$")
    self.fields = tuple(sorted(m[1] for m in map(first.match, names) if m and m[1] != "index"))
    self._maps = []
    for i in range(store.num_shards):
      idx = store.shard_indices(i)
      m = {k: _map(store.shard_path(i, k), len(idx)) for k in ("index", *self.fields)}
      if not np.array_equal(m["index"], idx):
        raise ValueError(f"{store.shard_path(i)} does not hold the indices {idx[0]}..{idx[-1]}; delete it to "
                         "rebuild its shard")
      self._maps.append(m)

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
  distributed.barrier("pairs: list the missing shards")
  todo = store.missing_shards()
  distributed.barrier("pairs: missing shards listed")
  if not todo:
    return
  n_dev = mesh.devices.size
  batch = sharding.batch_sharding(mesh)
  sample = jax.jit(sample_fn, out_shardings=batch)
  logging.info("building %d regression-pair shards of %d pairs in %s", len(todo), store.shard_size,
               store.directory)
  progress = Progress("pairs:", sum(len(store.shard_indices(i)) for i in todo), unit="pairs")
  pairs_done = 0
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
    pairs_done += len(idx)
    progress.update(pairs_done, f"shard {done}/{len(todo)} written")
