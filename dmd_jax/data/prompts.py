"""Text prompts for the text-to-image teachers (``configs/coco.py``): the prompt list, its CLIP text
embeddings (computed once, cached under the workdir) and deterministic per-step prompt choices.

Where the prompts come from (``data`` in ``configs/coco.py``):

* ``data.prompts`` — a tuple of prompts in the config itself (``configs/coco.py:tiny``), or
* ``data.prompts_file`` — a UTF-8 text file, one prompt per line (blank lines skipped), e.g. the LAION
  prompts the DMD paper used, or
* ``data.coco_split`` — every caption (about five per image) of a split of a prepared tensorflow-datasets
  ``coco_captions/2014`` under ``data.data_dir``, in record order (e.g. ``train``: 82,783 images; images are
  not decoded);

the first ``data.num_prompts`` of them (0: all). The embeddings ``[P, L, D]`` (the text encoder's
``last_hidden_state``, L = 77 for SD) are written to ``<workdir>/prompt_embeddings_<key>.npy`` (atomically,
``io.open_memmap_for_write``) in ``data.embedding_dtype`` (float32, or float16 to halve the cache: 500k SD
prompts are 118 GB in float32) and memory-mapped when read back, so a resumed run reuses them and a large set
never has to fit in host memory (a ``gs://`` workdir's cache is memory-mapped from a local copy,
``io.local_copy``). ``<key>`` hashes the prompts, the text encoder's folder and the dtype, so changing
any of them computes a new cache. Each process computes the set on its own devices (deterministic), and
writes it when it finds no cache.

Per step, the DM batch takes prompt ids from :class:`dmd_jax.data.indexed.EpochSampler` (a permutation per
epoch from ``(seed, epoch)``), so a resumed run sees the same prompts; regression pair ``i`` uses prompt
``i mod P`` and stores that id.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmd_jax import distributed, io, sharding
from dmd_jax.data.input_pipeline import coco_captions
from dmd_jax.loop import Progress

_DTYPES = {"float32": np.float32, "float16": np.float16}


def read_prompts_file(path: str, field: str = "data.prompts_file") -> list[str]:
  """One prompt per line (surrounding whitespace stripped, blank lines skipped); ``field`` names the config
  field in errors."""
  if not io.exists(path) or io.isdir(path):
    raise FileNotFoundError(f"{field}={path!r} does not exist (expected a text file, one prompt a line)")
  prompts = [line.strip() for line in io.read_text(path).split("\n")]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"{field}={path!r} holds no prompts")
  return prompts


def prompts_from_config(data) -> list[str]:
  """The training prompts named by the config's ``data`` block (see the module docstring)."""
  inline = [str(p) for p in (data.get("prompts") or ())]
  path = data.get("prompts_file", "")
  split = data.get("coco_split", "")
  if sum(map(bool, (inline, path, split))) > 1:
    raise ValueError("set one of data.prompts, data.prompts_file and data.coco_split")
  if path:
    prompts = read_prompts_file(path)
  elif split:
    t0 = time.time()
    prompts = [c for c in coco_captions(split, data.get("data_dir") or None, first_only=False) if c]
    logging.info("%d prompts from coco_captions[%s] in %.1f s", len(prompts), split, time.time() - t0)
  elif inline:
    prompts = inline
  else:
    raise ValueError("no training prompts: set data.prompts_file=FILE (one prompt a line), data.coco_split "
                     "(a prepared tfds coco_captions) or data.prompts")
  n = int(data.get("num_prompts", 0) or 0)
  if n < 0:
    raise ValueError(f"data.num_prompts must be >= 0 (0 = all), got {n}")
  return prompts[:n] if n else prompts


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
  """Token ids ``[N, max_length]`` (int32), padded and truncated as the SD pipelines do."""
  enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
  return np.asarray(enc.input_ids, np.int32)


class TextEncoder:
  """Host-side prompt → embedding: the pipeline's tokenizer and the frozen CLIP text transformer (jitted,
  fixed batch so it compiles once)."""

  def __init__(self, module, params, tokenizer, batch_size: int = 256):
    self.module, self.tokenizer = module, tokenizer
    self.params = jax.device_put(params, jax.local_devices()[0])
    self.max_length = int(module.config.max_position_embeddings)
    self.batch_size = int(batch_size)
    self._apply = jax.jit(lambda p, ids: module.apply({"params": p}, ids))

  def __call__(self, prompts: Sequence[str], dtype=np.float32) -> np.ndarray:
    """``[len(prompts), L, D]`` embeddings (``last_hidden_state``)."""
    prompts = list(prompts)
    b = min(self.batch_size, max(len(prompts), 1))
    out = []
    for i in range(0, len(prompts), b):
      chunk = prompts[i:i + b]
      ids = tokenize(self.tokenizer, chunk + [""] * (b - len(chunk)), self.max_length)
      out.append(np.asarray(jax.device_get(self._apply(self.params, ids)))[:len(chunk)].astype(dtype))
    return np.concatenate(out) if out else np.zeros((0, self.max_length, 0), dtype)


def cache_key(prompts: Sequence[str], encoder_id: str, dtype: str) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({"encoder": encoder_id, "dtype": dtype, "n": len(prompts)}).encode())
  for p in prompts:
    h.update(p.encode("utf-8") + b"\n")
  return h.hexdigest()[:16]


def _embed(path: str, prompts: Sequence[str], encode: Callable, np_dtype, chunk: int) -> None:
  """Writes the embeddings of ``prompts`` to the .npy ``path`` (memory-mapped, atomic), ``chunk`` at a time."""
  progress = Progress("prompt embeddings:", len(prompts), unit="prompts")
  first = encode(prompts[:chunk], np_dtype)
  with io.open_memmap_for_write(path, first.dtype, (len(prompts),) + first.shape[1:]) as arr:
    arr[:len(first)] = first
    for i in range(chunk, len(prompts), chunk):
      arr[i:i + chunk] = encode(prompts[i:i + chunk], np_dtype)
      progress.update(min(i + chunk, len(prompts)))


def cached_embeddings(workdir: str, prompts: Sequence[str], encode: Callable, encoder_id: str,
                      dtype: str = "float32", chunk: int = 4096) -> np.ndarray:
  """The embeddings of ``prompts`` from ``<workdir>/prompt_embeddings_<key>.npy`` (memory-mapped), computed
  with ``encode(list_of_prompts, np_dtype)`` and written atomically when absent. With several processes the
  set is computed once: each process embeds its share into a part file, process 0 joins the parts, and every
  process reads the joined file (docs/multihost.md)."""
  if dtype not in _DTYPES:
    raise ValueError(f"data.embedding_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  path = io.join(workdir, f"prompt_embeddings_{cache_key(prompts, encoder_id, dtype)}.npy")
  n_proc, me = jax.process_count(), jax.process_index()
  # every process decides between two barriers: the same decision, before anything is written
  distributed.barrier(f"prompt embeddings {path}: check")
  missing = not io.exists(path)
  distributed.barrier(f"prompt embeddings {path}: checked")
  if missing:
    logging.info("embedding %d prompts with the text encoder (cached in %s)", len(prompts), path)
    np_dtype = _DTYPES[dtype]
    if n_proc == 1:
      _embed(path, prompts, encode, np_dtype, chunk)
    else:
      share = sharding.process_share(len(prompts))
      part = lambda p: f"{path}.part{p}of{n_proc}.npy"
      if share.stop > share.start:
        _embed(part(me), prompts[share], encode, np_dtype, chunk)
      distributed.barrier(f"prompt embeddings {path}: parts written")
      if me == 0:
        pieces = [io.load_npy(io.local_copy(part(p)), mmap=True) for p in range(n_proc) if io.exists(part(p))]
        with io.open_memmap_for_write(path, pieces[0].dtype, (len(prompts),) + pieces[0].shape[1:]) as arr:
          start = 0
          for piece in pieces:
            arr[start:start + len(piece)] = piece
            start += len(piece)
        for p in range(n_proc):
          io.remove(part(p))
      distributed.barrier(f"prompt embeddings {path}: joined")
  table = io.load_npy(io.local_copy(path), mmap=True)   # a remote cache is memory-mapped from a local copy
  if table.shape[0] != len(prompts):
    raise ValueError(f"{path} holds {table.shape[0]} embeddings for {len(prompts)} prompts: delete it")
  return table


class PromptSet:
  """The training prompts and their (lazily computed, cached) embeddings.

  ``lookup(ids)`` gives host embeddings ``[len(ids), L, D]`` float32; ``eval_table(k)`` the embeddings of the
  first ``k`` prompts as a device constant (the sample grids' conditions).
  """

  def __init__(self, prompts: Sequence[str], encoder: TextEncoder, workdir: str | None, encoder_id: str,
               dtype: str = "float32"):
    self.prompts = list(prompts)
    self.encoder, self.workdir, self.encoder_id, self.dtype = encoder, workdir, encoder_id, dtype
    self._table = None

  def __len__(self):
    return len(self.prompts)

  @property
  def key(self) -> str:
    return cache_key(self.prompts, self.encoder_id, self.dtype)

  @property
  def table(self) -> np.ndarray:
    if self._table is None:
      if self.workdir is None:
        raise ValueError("the prompt embeddings need a workdir to be cached in")
      self._table = cached_embeddings(self.workdir, self.prompts, self.encoder, self.encoder_id, self.dtype)
    return self._table

  def lookup(self, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise ValueError(f"prompt ids must be in [0, {len(self)}), got [{ids.min()}, {ids.max()}]")
    order = np.argsort(ids, kind="stable")         # sorted reads of the memory map
    out = np.empty((len(ids),) + self.table.shape[1:], np.float32)
    out[order] = self.table[ids[order]]
    return out

  def eval_table(self, k: int = 64) -> jax.Array:
    return jnp.asarray(self.table[:min(k, len(self))], jnp.float32)
