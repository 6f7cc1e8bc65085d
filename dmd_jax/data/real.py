"""Real samples for DMD2's GAN critic (docs/method.md §7): the critic sees real data with its own conditions.

One source per kind of teacher, chosen by ``config.gan.real_data.source``:

=================  =====================================================  ======================================
source             real_x (the teacher's sample space)                    real_cond
=================  =====================================================  ======================================
``'mixture'``      draws from the toy's true mixture (``config.toy``)     int32 zeros
``'tfds'``         images of a prepared tfds dataset (``dataset``,        the dataset's labels (class-
                   ``split``, ``data_dir``), uint8 → [-1, 1], centre-     conditional teachers) or int32
                   cropped and resized to the teacher's size when they    zeros (unconditional ones)
                   differ, then ``Teacher.encode`` (pixel teachers: the
                   identity)
``'coco_latents'`` the first ``num_images`` images of a ``coco_captions`` the text embeddings [n, L, D] of each
                   split, centre-cropped and resized to ``image_size``,   image's first caption
                   VAE-encoded **once** (``Teacher.encode``: posterior
                   mean × scaling factor) into shards under
                   ``<workdir>/real_latents/``
``'digits'``       scikit-learn's 1,797 digits at the teacher's size      their labels
                   (``data/digits.py``, ``configs/digits.py``)
=================  =====================================================  ======================================

**Indexed by step** (``data/indexed.py``). The global real batch of train step ``s`` (global size ``B``) is a
pure function of (seed, ``s``, ``B``): the mixture draws it from ``np.random.default_rng((*seed, s))``; the
datasets are ``indexed.StepIndexed`` record sets, whose batch ``s`` is the records
``EpochSampler(num_records, B, seed).indices(s)`` (a fresh permutation every epoch). ``batch(s, B, rows)``
returns only the rows ``rows`` of that global batch (``sharding.process_slice``: contiguous), and a process
reads and decodes only those records. So:

* the rows do not depend on the process count (the concatenation of every process's rows is the one-process
  global batch), and
* a resumed run gets exactly the batches of the uninterrupted one. The state that the trainer stores in the
  checkpoint metadata (:meth:`state`) is therefore small — what the data is (source, dataset, split, record
  count, seed), the global batch size and the next step — and :meth:`restore` checks it against this run's
  data (a clear error naming the differences) rather than restoring a position.

**Seed.** The ``'real_data'`` random stream: ``streams.numpy_seed(config.seed, 'real_data')``
(:func:`real_data_seed`).

**The SD latent store** (``'coco_latents'``, :func:`ensure_latents`): a ``data/pairs.PairStore`` under
``<workdir>/real_latents/`` whose ``spec.json`` names the dataset, split, ``num_images`` (the store's
``num_pairs``), ``shard_size``, ``image_size`` and the teacher (the converted pipeline's folder, as the prompt
cache names it, and its latent shape); shard ``NNNNN`` is the ``.npy`` files ``shard-NNNNN.index.npy`` (the record
indices) and ``shard-NNNNN.x.npy`` (float32 latents). Shards are written atomically by process 0 after every process has encoded its rows of the
shard over the whole mesh (as ``pairs.build_pairs`` does for teacher samples), so a killed build resumes at
the missing shards and a half-written shard never replaces a good one; a folder built with another spec is an
error naming it. The captions' embeddings are the teacher's ``conditions.encode_text`` of each image's first
caption, cached in the workdir by ``prompts.cached_embeddings`` (the training prompts' cache, keyed by the
captions and the text encoder). Reading a batch touches only its rows (memory-mapped shards, ``PairRows``).

**Conditions** come from what the teacher exposes: ``conditions.text`` (text-to-image teachers) and, for
class-conditional ones, ``conditions.num_classes``; a teacher whose conditions have neither is unconditional
(zeros).

Optional key: ``gan.real_data.encode_batch_size`` — images per VAE call while building the store (global;
default 8 per device). Keys a source does not use (``image_size``, ``num_images``, ``shard_size`` for
``'tfds'``; everything but ``source`` for ``'mixture'``) are ignored.
"""
from __future__ import annotations

import functools
import json
from typing import Protocol

import jax
import numpy as np
from absl import logging

from dmd_jax import distributed, io, sharding, streams
from dmd_jax.data import digits, input_pipeline as ip
from dmd_jax.data.indexed import StepIndexed, parallel_map
from dmd_jax.data.pairs import PairRows, PairStore
from dmd_jax.data.prompts import cached_embeddings
from dmd_jax.data.toy import GaussianMixture
from dmd_jax.loop import Progress

STATE_FORMAT = 1
ENCODE_ROWS_PER_DEVICE = 8
LATENTS_FOLDER = "real_latents"


class RealData(Protocol):
  """A source of real samples for the GAN critic (module docstring).

  - ``batch(step, batch_size, rows)``: this process's rows ``rows`` of the global real batch of train step
    ``step`` (global size ``batch_size``): ``{'real_x': float32 [n, *teacher.sample_shape] in the teacher's
    sample space, 'real_cond': the conditions as the networks take them (int32 labels or zeros; SD: float32
    text embeddings [n, L, D])}``. A pure function of (seed, step, batch_size, rows).
  - ``state()``: JSON-serialisable; what the data is and the next step (the one after the last ``batch``).
  - ``restore(state)``: before the first ``batch`` of a resumed run; a clear error when ``state`` belongs to
    other real data or another batch size, and when the next ``batch`` is not for the saved next step.
  """

  def batch(self, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]: ...
  def state(self) -> dict: ...
  def restore(self, state: dict) -> None: ...


def real_data_seed(seed: int) -> tuple[int, int]:
  """The host seed sequence of the ``'real_data'`` stream (``streams.numpy_seed``)."""
  return streams.numpy_seed(seed, "real_data")


def make_real_data(run, cfg) -> RealData:
  """The real-data source of ``cfg = run.config.gan.real_data`` for ``run`` (a ``train.Run``: config, workdir,
  mesh, teacher, frozen). Builds what must be built first — ``'coco_latents'``: the latent store and the
  caption embeddings, on every process (process 0 writes)."""
  source = cfg.source
  if source not in SOURCES:
    raise ValueError(f"gan.real_data.source must be one of {', '.join(map(repr, SOURCES))}, got {source!r}")
  return SOURCES[source](run, cfg)


# ---------------------------------------------------------------------------------------------------------
# What every source shares: indexing by step, the state and its checks.
# ---------------------------------------------------------------------------------------------------------

def _normalised(x):
  return json.loads(json.dumps(x))


class _RealData:
  """The step bookkeeping of every source; subclasses set ``source``, ``identity`` (a JSON dict: what the
  batches are a function of besides the step and the batch size), ``seed`` and ``num_records`` (``None``:
  unlimited), and implement ``_rows(step, batch_size, rows)``."""
  source: str
  identity: dict
  seed: tuple
  num_records: int | None = None
  records_name = ""    # the config key and value that set num_records, for errors

  def __init__(self):
    self._batch_size: int | None = None
    self._next_step: int | None = None
    self._expect: int | None = None     # the step a restored state says comes next

  def batch(self, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]:
    step, batch_size = int(step), int(batch_size)
    if self._expect is not None and step != self._expect:
      raise ValueError(f"the real data was restored at step {self._expect} (its state in the checkpoint metadata) "
                       f"but asked for step {step}: the state does not belong to this checkpoint")
    if self._batch_size is not None and batch_size != self._batch_size:
      raise ValueError(f"the real batch size changed from {self._batch_size} to {batch_size}: the batches of a "
                       "run (and of its resumed run) need one global batch size")
    if batch_size < 1 or step < 0:
      raise ValueError(f"real batch: step must be >= 0 and batch_size >= 1, got step={step}, "
                       f"batch_size={batch_size}")
    if not isinstance(rows, slice) or rows.step not in (None, 1):
      raise ValueError(f"rows must be a contiguous slice (sharding.process_slice), got {rows!r}")
    if self.num_records is not None and batch_size > self.num_records:
      raise ValueError(f"{self.records_name} gives {self.num_records} real records, fewer than the global real "
                       f"batch of {batch_size}")
    out = self._rows(step, batch_size, rows)
    self._batch_size, self._next_step, self._expect = batch_size, step + 1, None
    return out

  def _rows(self, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _what(self) -> dict:
    return _normalised({"format": STATE_FORMAT, "source": self.source, **self.identity, "seed": list(self.seed)})

  def state(self) -> dict:
    s = {**self._what(), "batch_size": self._batch_size, "next_step": self._next_step}
    json.dumps(s)   # fail here, not when the checkpoint is written
    return s

  def restore(self, state: dict) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "source" not in state:
      raise ValueError(f"not a real-data state (format {STATE_FORMAT}): {str(state)[:200]}")
    now = self._what()
    diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if diff:
      raise ValueError("the saved real-data state (checkpoint metadata) belongs to other real data; differing "
                       "settings (saved, now): " + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in sorted(diff.items()))
                       + "; resume with the config the checkpoint was written with")
    b, s = state.get("batch_size"), state.get("next_step")
    self._batch_size = None if b is None else int(b)
    self._next_step = self._expect = None if s is None else int(s)


class _Records(_RealData):
  """A source of ``num_records`` records visited in epoch order: an ``indexed.StepIndexed`` over ``_read``
  (record indices → ``{'real_x', 'real_cond'}``)."""

  @functools.cached_property
  def records(self) -> StepIndexed:
    return StepIndexed(self.num_records, self.seed, self._read)

  def indices(self, step: int, batch_size: int) -> np.ndarray:
    """The record indices of the global real batch of ``step`` (int64 [batch_size])."""
    return self.records.indices(step, batch_size)

  def _rows(self, step, batch_size, rows):
    return self.records.batch(step, batch_size, rows)

  def _read(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# 'mixture': the toy's true distribution.
# ---------------------------------------------------------------------------------------------------------

class MixtureData(_RealData):
  """Draws from the toy's Gaussian mixture (``data.toy.GaussianMixture.from_config(config.toy)``): the global
  batch of step ``s`` comes from ``default_rng((*seed, s))`` (B × D floats: cheap on every process), and a
  process keeps its rows."""
  source = "mixture"

  def __init__(self, run, cfg):
    super().__init__()
    config, teacher = run.config, run.teacher
    if "toy" not in config or teacher.images:
      raise ValueError(f"gan.real_data.source='mixture' draws from config.toy, the toy teacher's mixture; this run's "
                       f"teacher is {teacher.name!r}: use 'tfds' (pixel teachers) or 'coco_latents' (Stable "
                       "Diffusion)")
    self.mixture = GaussianMixture.from_config(config.toy)
    if tuple(teacher.sample_shape) != (self.mixture.means.shape[1],):
      raise ValueError(f"config.toy's mixture is {self.mixture.means.shape[1]}-dimensional, the teacher's samples "
                       f"have shape {tuple(teacher.sample_shape)}")
    self.teacher, self.frozen = teacher, run.frozen
    self.seed = real_data_seed(config.seed)
    m = self.mixture
    self.identity = {"mixture": {"weights": m.weights.tolist(), "means": m.means.tolist(), "std": m.std}}

  def _rows(self, step, batch_size, rows):
    x = self.mixture.sample(np.random.default_rng([*self.seed, step]), batch_size)[rows].astype(np.float32)
    x = np.asarray(self.teacher.encode(self.frozen, x), np.float32)    # the toy's encode: the identity
    return {"real_x": x, "real_cond": np.zeros((len(x),), np.int32)}


# ---------------------------------------------------------------------------------------------------------
# 'tfds': images (and labels) of a prepared dataset, for pixel teachers.
# ---------------------------------------------------------------------------------------------------------

def _open_source(cfg, name: str, decode_images: bool = True):
  """``input_pipeline.open_source`` of the configured split; its not-prepared errors (which name the dataset,
  the folder and how to prepare it) are prefixed with the config keys that chose it."""
  data_dir = cfg.data_dir or None
  try:
    return ip.open_source(name, cfg.split, data_dir, decode_images=decode_images)
  except (FileNotFoundError, ValueError) as e:
    where = f"gan.real_data.dataset={cfg.dataset!r}, split={cfg.split!r}, data_dir={cfg.data_dir!r}"
    raise type(e)(f"{where}: {e}") from e


def _resolve(cfg):
  try:
    return ip.resolve_name(cfg.dataset)
  except ValueError as e:
    raise ValueError(f"gan.real_data.dataset: {e}") from None


def _examples(source, indices) -> list:
  """The examples ``indices`` of a random-access source (read and decoded in parallel)."""
  return parallel_map(lambda i: source[int(i)], np.asarray(indices).tolist())


def _square_rgb(example, size: int) -> np.ndarray:
  """An example's image as uint8 [size, size, 3]: as it is when it has that size, else centre-cropped and
  resized (``input_pipeline.center_crop_resize``, PIL bicubic)."""
  return ip.center_crop_resize(np.asarray(example["image"]), size)


def to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 images → float32 in [-1, 1] (x / 127.5 - 1)."""
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


class TfdsImages(_Records):
  """Images of a prepared tfds dataset (``input_pipeline.open_source``: random access, ArrayRecord) for a pixel
  teacher of sample shape ``[S, S, 3]``: the records of step ``s`` in epoch order, uint8 → [-1, 1], resized
  only when the dataset's size is not ``S``, then ``Teacher.encode`` (the identity for pixel teachers; applied
  here on the host so that every source honours the same contract). Labels: the dataset's for a teacher whose
  conditions are class labels (``conditions.num_classes``; an error when the dataset's label range exceeds it),
  zeros for an unconditional one."""
  source = "tfds"

  def __init__(self, run, cfg):
    super().__init__()
    teacher, conditions = run.teacher, run.teacher.conditions
    key, spec = _resolve(cfg)
    shape = tuple(teacher.sample_shape)
    if not teacher.images or conditions.text:
      hint = "'coco_latents'" if conditions.text else "'mixture'"
      raise ValueError(f"gan.real_data.source='tfds' feeds pixel teachers with class labels or none; this run's "
                       f"teacher ({teacher.name!r}) needs {hint}")
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
      raise ValueError(f"gan.real_data.dataset={key!r} has RGB images; the teacher ({teacher.name!r}) takes samples "
                       f"of shape {shape}, which square RGB images cannot be resized to")
    self.num_classes = getattr(conditions, "num_classes", None)   # None: unconditional
    if self.num_classes is not None:
      if not spec.has_label:
        raise ValueError(f"gan.real_data.dataset={key!r} has no labels; the teacher ({teacher.name!r}) is "
                         f"class-conditional ({self.num_classes} classes)")
      self.num_classes = int(self.num_classes)
    self.source_data = _open_source(cfg, key)
    self.num_records = len(self.source_data)
    self.records_name = f"gan.real_data.dataset={key!r} (split {cfg.split!r})"
    if self.num_records == 0:
      raise ValueError(f"{self.records_name} is empty")
    self.size = shape[0]
    first = np.asarray(self.source_data[0]["image"])
    if self.num_classes is not None:
      dataset_classes = _num_classes(self.source_data)
      if dataset_classes is not None and dataset_classes > self.num_classes:
        raise ValueError(f"gan.real_data.dataset={key!r} has {dataset_classes} classes, more than the teacher's "
                         f"{self.num_classes} ({teacher.name!r})")
    self.teacher, self.frozen = teacher, run.frozen
    self.seed = real_data_seed(run.config.seed)
    self.identity = {"dataset": key, "split": cfg.split, "num_records": self.num_records}
    resized = "" if first.shape[:2] == (self.size, self.size) else f", resized to {self.size}x{self.size}"
    logging.info("real data: %s[%s], %d records (%dx%d images%s), labels: %s", key, cfg.split, self.num_records,
                 first.shape[0], first.shape[1], resized, "the dataset's" if self.num_classes else "zeros")

  def _read(self, idx):
    examples = _examples(self.source_data, idx)
    images = np.stack([_square_rgb(ex, self.size) for ex in examples]) if examples else \
        np.zeros((0, self.size, self.size, 3), np.uint8)
    x = np.asarray(self.teacher.encode(self.frozen, to_unit(images)), np.float32)
    if self.num_classes is None:
      cond = np.zeros((len(idx),), np.int32)
    else:
      cond = np.asarray([int(ex["label"]) for ex in examples], np.int32).reshape(len(idx))
      if cond.size and (cond.min() < 0 or cond.max() >= self.num_classes):
        raise ValueError(f"{self.records_name}: label {int(cond.max())} is outside the teacher's "
                         f"{self.num_classes} classes")
    return {"real_x": x, "real_cond": cond}


def _num_classes(source) -> int | None:
  """The label count in a tfds source's features, when it says."""
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None


# ---------------------------------------------------------------------------------------------------------
# 'coco_latents': Stable Diffusion — real images VAE-encoded once, with their captions' embeddings.
# ---------------------------------------------------------------------------------------------------------

def teacher_id(run) -> str:
  """What identifies the teacher's encoders in a spec or a cache key: the converted pipeline's folder, as the
  training prompts' cache names it (``PromptSet.encoder_id``), else ``teacher.path``."""
  prompts = getattr(run.teacher.conditions, "prompts", None)
  encoder_id = getattr(prompts, "encoder_id", None)
  return str(encoder_id) if encoder_id else str(run.config.teacher.path)


def latent_image_size(run, cfg) -> int:
  """``gan.real_data.image_size``, or (0) the size of the images the teacher decodes its samples to (8 × the
  latent size for SD); checked: ``Teacher.encode`` of images this size has the teacher's sample shape."""
  teacher = run.teacher
  shape = tuple(teacher.sample_shape)
  size = int(cfg.image_size)
  if size < 0:
    raise ValueError(f"gan.real_data.image_size must be >= 0 (0 = the teacher's image size), got {size}")
  if size == 0:
    decoded = jax.eval_shape(teacher.decode, run.frozen, jax.ShapeDtypeStruct((1,) + shape, np.float32)).shape
    size = int(decoded[1])
  got = jax.eval_shape(teacher.encode, run.frozen, jax.ShapeDtypeStruct((1, size, size, 3), np.float32)).shape
  if tuple(got[1:]) != shape:
    raise ValueError(f"gan.real_data.image_size={cfg.image_size}: images of {size}x{size} encode to "
                     f"{tuple(got[1:])}, not the teacher's sample shape {shape}")
  return size


def latent_store(run, cfg, image_size: int) -> PairStore:
  """The (unopened) latent store of ``cfg`` under ``<workdir>/real_latents``."""
  key, _ = _resolve(cfg)
  spec = {"content": "real_latents", "dataset": key, "split": cfg.split, "num_pairs": int(cfg.num_images),
          "shard_size": int(cfg.shard_size), "image_size": int(image_size), "teacher": teacher_id(run),
          "sample_shape": [int(d) for d in run.teacher.sample_shape]}
  return PairStore(io.join(run.workdir, LATENTS_FOLDER), spec, what="real latents",
                   config_names={"num_pairs": "num_images"})


def build_latents(store: PairStore, encode_fn, frozen, mesh, load_images, chunk: int) -> int:
  """Builds every missing shard of ``store``; returns how many it built. Every process runs the same programs
  in the same order: the images of a shard are encoded ``chunk`` at a time (each call padded to ``chunk``
  rows, a multiple of the device count, so it compiles once), each process decoding and feeding its own rows
  (``load_images(record_indices) -> float32 [n, S, S, 3]``); the latents are gathered and process 0 writes the
  shard, atomically (docs/multihost.md). ``encode_fn(frozen, images) -> latents`` (``Teacher.encode``) runs
  jitted over ``mesh``, ``frozen`` (the parameters on the mesh) passed as an argument, not baked in."""
  distributed.barrier("real latents: list the missing shards")   # the same list on every process, before any write
  todo = store.missing_shards()
  distributed.barrier("real latents: missing shards listed")
  if not todo:
    return 0
  n_dev = mesh.devices.size
  if chunk < 1 or chunk % n_dev:
    raise ValueError(f"the encode batch {chunk} must be a positive multiple of the device count {n_dev}")
  encode = jax.jit(encode_fn, out_shardings=sharding.batch_sharding(mesh))
  mine = sharding.process_slice(chunk)
  logging.info("real latents: encoding %d shards of up to %d images (%d a call) into %s", len(todo),
               store.shard_size, chunk, store.directory)
  progress = Progress("real latents:", sum(len(store.shard_indices(i)) for i in todo), unit="images")
  images_done = 0
  for done, i in enumerate(todo, 1):
    idx = store.shard_indices(i)
    parts = []
    for start in range(0, len(idx), chunk):
      part = idx[start:start + chunk]
      padded = np.concatenate([part, np.full(chunk - len(part), part[-1])])
      local = {"images": load_images(padded[mine])}
      g = sharding.global_batch(mesh, local, chunk)
      parts.append(sharding.gather(encode(frozen, g["images"]))[:len(part)])
    if jax.process_index() == 0:
      store.write_shard(i, {"index": idx, "x": np.concatenate(parts).astype(np.float32)})
    images_done += len(idx)
    progress.update(images_done, f"shard {done}/{len(todo)} written")
  return len(todo)


class _ImageLoader:
  """Record indices → float32 images [n, S, S, 3] in [-1, 1] (centre crop, resize, ``to_unit``) of the configured
  split; the dataset is opened on first use, so a complete store never opens it."""

  def __init__(self, cfg, key: str, size: int):
    self.cfg, self.key, self.size = cfg, key, size
    self.source = None

  def __call__(self, indices) -> np.ndarray:
    if self.source is None:
      self.source = _open_source(self.cfg, self.key)
    return to_unit(np.stack([_square_rgb(ex, self.size) for ex in _examples(self.source, indices)]))


class CocoLatents(_Records):
  """Stable Diffusion's real data: the first ``num_images`` images of a ``coco_captions`` split as VAE latents
  (built once per workdir, :func:`build_latents`) with the text embeddings of each image's first caption
  (cached, ``prompts.cached_embeddings``). Batches read only their rows of both."""
  source = "coco_latents"

  def __init__(self, run, cfg):
    super().__init__()
    teacher, config = run.teacher, run.config
    key, spec = _resolve(cfg)
    if not teacher.conditions.text:
      raise ValueError(f"gan.real_data.source='coco_latents' needs a text-to-image teacher (captions → text "
                       f"embeddings); this run's teacher is {teacher.name!r}: use 'tfds' or 'mixture'")
    if not spec.has_captions:
      raise ValueError(f"gan.real_data.source='coco_latents' reads captioned images: gan.real_data.dataset must be "
                       f"'coco_captions', got {cfg.dataset!r}")
    n, shard_size = int(cfg.num_images), int(cfg.shard_size)
    if n < 1:
      raise ValueError(f"gan.real_data.num_images must be >= 1, got {n}")
    if shard_size < 1:
      raise ValueError(f"gan.real_data.shard_size must be >= 1, got {shard_size}")
    if run.workdir is None:
      raise ValueError("gan.real_data.source='coco_latents' needs a workdir to store the latents in")
    self.num_records = n
    self.records_name = f"gan.real_data.num_images={n}"
    self.image_size = latent_image_size(run, cfg)
    self.seed = real_data_seed(config.seed)
    self.identity = {"dataset": key, "split": cfg.split, "num_records": n, "image_size": self.image_size}

    # captions: the first of each image, in record order (images not decoded)
    try:
      captions = ip.coco_captions(cfg.split, cfg.data_dir or None, first_only=True, limit=n)
    except (FileNotFoundError, ValueError) as e:
      raise type(e)(f"gan.real_data (dataset={cfg.dataset!r}, split={cfg.split!r}, data_dir={cfg.data_dir!r}, "
                    f"num_images={n}): {e}") from e
    if len(captions) != n:
      raise ValueError(f"gan.real_data: {n - len(captions)} of the first {n} images of coco_captions[{cfg.split}] "
                       "have no caption")
    self.captions = captions
    self.store = latent_store(run, cfg, self.image_size).open()   # a spec mismatch fails before any work

    # the captions' text embeddings (cached like the training prompts')
    conditions = teacher.conditions
    dtype = config.data.get("embedding_dtype", "float32") if "data" in config else "float32"
    logging.info("real data: the first captions of %d coco_captions[%s] images", n, cfg.split)
    self.embeddings = cached_embeddings(run.workdir, captions,
                                        lambda texts, d: conditions.encode_text(texts).astype(d),
                                        teacher_id(run), dtype)

    # the latents: built once per workdir
    chunk = int(cfg.get("encode_batch_size", 0) or ENCODE_ROWS_PER_DEVICE * run.mesh.devices.size)
    n_dev = run.mesh.devices.size
    chunk = min(-(-chunk // n_dev) * n_dev, -(-shard_size // n_dev) * n_dev)
    built = build_latents(self.store, teacher.encode, run.frozen, run.mesh,
                          _ImageLoader(cfg, key, self.image_size), chunk)
    if built:
      logging.info("real latents: %d shards of %d coco_captions[%s] images at %dpx built in %s", built, n,
                   cfg.split, self.image_size, self.store.directory)
    distributed.barrier("real latents built")
    self.latents: PairRows = self.store.rows()

  def _read(self, idx):
    x = self.latents.take(idx)["x"].astype(np.float32)
    order = np.argsort(idx, kind="stable")           # sorted reads of the memory map
    cond = np.empty((len(idx),) + self.embeddings.shape[1:], np.float32)
    cond[order] = self.embeddings[idx[order]]
    return {"real_x": x, "real_cond": cond}


# ---------------------------------------------------------------------------------------------------------
# 'digits': scikit-learn's digits (configs/digits.py), in memory.
# ---------------------------------------------------------------------------------------------------------

class DigitsData(_Records):
  """The 1,797 digits of ``data/digits.py`` at the teacher's size (``[S, S, 1]``), with their labels, in
  epoch order: the data the digits teacher was trained on."""
  source = "digits"

  def __init__(self, run, cfg):
    super().__init__()
    teacher = run.teacher
    shape = tuple(teacher.sample_shape)
    if not teacher.images or len(shape) != 3 or shape[0] != shape[1] or shape[2] != 1:
      raise ValueError(f"gan.real_data.source='digits' feeds grey square images [S, S, 1]; this run's teacher "
                       f"({teacher.name!r}) takes samples of shape {shape}")
    if getattr(teacher.conditions, "num_classes", None) != digits.NUM_CLASSES:
      raise ValueError(f"gan.real_data.source='digits' has {digits.NUM_CLASSES} classes; the teacher "
                       f"({teacher.name!r}) needs {type(teacher.conditions).__name__}")
    self.images, self.labels = digits.load(shape[0])
    self.num_records = len(self.images)
    self.records_name = "gan.real_data.source='digits'"
    self.seed = real_data_seed(run.config.seed)
    self.identity = {"dataset": "digits", "image_size": shape[0], "num_records": self.num_records}

  def _read(self, idx):
    return {"real_x": np.array(self.images[idx]), "real_cond": np.array(self.labels[idx])}


SOURCES = {"mixture": MixtureData, "tfds": TfdsImages, "coco_latents": CocoLatents, "digits": DigitsData}
