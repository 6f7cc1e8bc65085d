"""Real-data input pipelines on ``grain`` + ``tensorflow_datasets.data_source`` (ArrayRecord, no TensorFlow).

Datasets (prepared once by the user into ``data_dir`` in the ArrayRecord format; nothing is downloaded here):

===========================  ================================  ===========================================
name                         tfds dataset                      each example
===========================  ================================  ===========================================
``cifar10``                  ``cifar10``                       ``image`` uint8 [32, 32, 3], ``label`` int32
``imagenet_resized/64x64``   ``imagenet_resized/64x64``        ``image`` uint8 [64, 64, 3], ``label`` int32
``coco_captions``            ``coco_captions/2014``            ``image`` uint8 [H, W, 3], ``caption`` str
===========================  ================================  ===========================================

Every example also carries ``index`` (int64): its record index within the split. ``image_size`` centre-crops
to a square and resizes (PIL bicubic) to ``image_size × image_size``; COCO images vary in size, so without
``image_size`` a COCO batch's ``image`` is an object array of ``[H, W, 3]`` arrays. A COCO example's caption
is one of its (usually five) captions, drawn with a generator seeded by ``(seed, position in the stream)``:
deterministic, and different from epoch to epoch (``caption='first'`` always takes the first).

**Order and sharding.** The global stream is the split shuffled with ``seed`` (reshuffled every epoch) and
repeated ``num_epochs`` times (``None``: forever). Global batch ``b`` is stream positions
``[b·G, (b+1)·G)``; process ``p`` of ``P`` receives positions ``b·G + p + P·j`` (``j < G/P``). So the
processes' rows are disjoint, together they are exactly the global batch, and the global stream does not
depend on ``P``. The remainder of a finite stream is dropped.

**Single pass** (``shuffle=False, num_epochs=1``, e.g. for FID reference statistics): the split in record order,
every example exactly once across processes, the last batch shorter. Every process yields the same number of
batches (a process may get a shorter, even empty, last batch), so per-batch collectives stay aligned.

**Resuming.** ``ResumableIterator.get_state()`` is a small JSON-serialisable dict (store it in the
checkpoint's metadata); ``set_state(state)`` on an iterator built with the same arguments continues with
exactly the batches the saved one would have produced next. Without worker processes the state is the same
on every process and does not depend on the process count.

    it = make_image_pipeline('cifar10', 'train', data_dir='~/tensorflow_datasets', global_batch_size=512,
                             seed=0)
    batch = next(it)                 # {'image': uint8 [512/P, 32, 32, 3], 'label': int32 [512/P], 'index'}
    meta = {'data': it.get_state()}  # json.dumps-able
    ...
    it.set_state(meta['data'])

Preparing a dataset (once, on a machine with TensorFlow; ImageNet needs its manual download)::

    tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record
    # or: tfds.builder('cifar10', data_dir=DATA_DIR, file_format='array_record').download_and_prepare()
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from typing import Any, Iterator

import numpy as np
from absl import logging

STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  tfds_name: str          # the tfds builder name
  config: str | None      # the builder config, a folder level under data_dir/tfds_name
  splits: tuple[str, ...]  # the splits of the real dataset (for messages)
  has_label: bool
  has_captions: bool
  prepare_note: str = ""


SUPPORTED: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", None, ("train", "test"), has_label=True, has_captions=False),
    "imagenet_resized/64x64": DatasetSpec(
        "imagenet_resized", "64x64", ("train", "validation"), has_label=True, has_captions=False,
        prepare_note=" (needs the ImageNet 2012 downsampled 64x64 archives in the tfds manual_dir first)"),
    "coco_captions": DatasetSpec(
        "coco_captions", "2014", ("train", "val", "test", "restval"), has_label=False, has_captions=True),
}
ALIASES = {"coco_captions/2014": "coco_captions", "imagenet64": "imagenet_resized/64x64",
           "imagenet_resized_64x64": "imagenet_resized/64x64"}


def resolve_name(name: str) -> tuple[str, DatasetSpec]:
  key = ALIASES.get(name, name)
  if key not in SUPPORTED:
    raise ValueError(f"unknown dataset {name!r}: supported are {', '.join(map(repr, SUPPORTED))}")
  return key, SUPPORTED[key]


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def _prepare_hint(key: str, spec: DatasetSpec, data_dir: str) -> str:
  full = spec.tfds_name + (f"/{spec.config}" if spec.config else "")
  return (f"prepare it once (where TensorFlow is installed{spec.prepare_note}) with\n"
          f"  tfds build {full} --data_dir={data_dir} --file_format=array_record\n"
          f"or tfds.builder({full!r}, data_dir={data_dir!r}, file_format='array_record')"
          ".download_and_prepare(); this pipeline reads prepared ArrayRecord files only and downloads nothing")


def _data_dir(data_dir) -> str:
  if data_dir is None:
    return default_data_dir()
  data_dir = os.fspath(data_dir)
  return data_dir if "://" in data_dir else os.path.expanduser(data_dir)


def find_prepared(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, str]:
  """``(tfds_name_with_config, version)`` of the newest prepared version of ``name`` under ``data_dir``.

  Raises ``FileNotFoundError`` naming the folder and how to prepare the dataset when there is none.
  """
  from etils import epath  # local folders and gs:// alike

  key, spec = resolve_name(name)
  data_dir = _data_dir(data_dir)
  full = spec.tfds_name + (f"/{spec.config}" if spec.config else "")
  folder = epath.Path(data_dir) / full
  if not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(f"tfds data_dir {data_dir!r} does not exist; dataset {key!r} is expected in "
                            f"{os.fspath(folder)!r}: {_prepare_hint(key, spec, data_dir)}")
  versions = []
  if folder.is_dir():
    for v in folder.iterdir():
      try:
        _version_key(v.name)
      except ValueError:
        continue  # e.g. incomplete.XXXX_1.0.0 folders of an interrupted build
      if (v / "dataset_info.json").exists():
        versions.append(v.name)
  if not versions:
    raise FileNotFoundError(f"dataset {key!r} is not prepared in {data_dir!r} (no <version>/dataset_info.json "
                            f"under {os.fspath(folder)!r}): {_prepare_hint(key, spec, data_dir)}")
  version = max(versions, key=_version_key)
  return full, version


def _check_split_and_format(key: str, data_dir: str, full: str, version: str, split: str) -> bool:
  """Checks the split exists and ArrayRecord files are there; True when they are an alternative format."""
  from etils import epath

  folder = epath.Path(data_dir) / full / version
  info = json.loads((folder / "dataset_info.json").read_text())
  fmt = info.get("fileFormat", "tfrecord")
  alternative = "array_record" in info.get("alternativeFileFormats", [])
  if fmt != "array_record" and not alternative:
    raise ValueError(f"dataset {key!r} in {os.fspath(folder)!r} is prepared as {fmt!r}, but "
                     f"tfds.data_source reads 'array_record' only: rebuild it with --file_format=array_record "
                     f"(or convert it with `tfds convert_format --dataset_version_dir={os.fspath(folder)} "
                     "--out_file_format=array_record`)")
  present = [s.get("name") for s in info.get("splits", [])]
  for part in split.split("+"):
    base = part.split("[")[0].strip()
    if present and base not in present:
      raise ValueError(f"dataset {key!r} ({os.fspath(folder)}) has no split {base!r}; prepared splits: "
                       f"{', '.join(present)}")
  return fmt != "array_record"


def open_source(name: str, split: str, data_dir: str | os.PathLike | None = None, decode_images: bool = True):
  """The ``tfds.data_source`` (random access, decoded examples) of a prepared split, read from files.

  The dataset is opened by explicit version (``name:version``), so tfds reads its ``dataset_info.json`` and
  ``features.json`` rather than instantiating the builder code (COCO's needs TensorFlow); ``download=False``.
  ``decode_images=False`` leaves ``image`` as its encoded bytes (reading captions only is then cheap).
  """
  import tensorflow_datasets as tfds

  key, _ = resolve_name(name)
  data_dir = _data_dir(data_dir)
  full, version = find_prepared(key, data_dir)
  alternative = _check_split_and_format(key, data_dir, full, version, split)
  builder_kwargs = {"file_format": "array_record"} if alternative else None
  decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
  return tfds.data_source(f"{full}:{version}", split=split, data_dir=data_dir, download=False,
                          try_gcs=False, builder_kwargs=builder_kwargs, decoders=decoders)


def coco_captions(split: str, data_dir: str | os.PathLike | None = None, *, first_only: bool,
                  limit: int | None = None) -> list[str]:
  """Captions of a prepared ``coco_captions`` split in record order, without decoding the images:
  ``first_only`` — the first caption of each image (one per image); else every caption of every image.
  ``limit``: the first this many images. Whitespace inside a caption is collapsed to single spaces."""
  source = open_source("coco_captions", split, data_dir, decode_images=False)
  n = len(source) if limit is None else int(limit)
  if n > len(source):
    raise ValueError(f"coco_captions split {split!r} has {len(source)} images, fewer than the {n} asked for")
  out = []
  for i in range(n):
    texts = [" ".join(_to_str(t).split()) for t in _caption_texts(source[i])]
    out.extend(texts[:1] if first_only else texts)
  return out


# ---------------------------------------------------------------------------------------------------------
# Per-example processing
# ---------------------------------------------------------------------------------------------------------

def _caption_texts(example) -> list:
  """A COCO example's captions (``captions/text``: one string or a sequence) as a list of str / bytes."""
  texts = example["captions"]["text"]
  return [texts] if isinstance(texts, (str, bytes)) else list(np.asarray(texts).reshape(-1))


def _to_str(x) -> str:
  if isinstance(x, (bytes, np.bytes_)):
    return bytes(x).decode("utf-8")
  return str(x)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Centre square crop, then PIL bicubic resize to ``size × size`` (uint8 HWC in, uint8 HWC out)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  if s == size:
    return np.ascontiguousarray(image, np.uint8)
  from PIL import Image
  out = Image.fromarray(np.ascontiguousarray(image, np.uint8)).resize((size, size), Image.BICUBIC)
  return np.asarray(out, np.uint8)


class _Process:
  """Record index → processed example (a picklable ``grain`` random map, for worker processes)."""

  def __init__(self, source, spec: DatasetSpec, image_size: int | None, caption: str, num_records: int):
    self.source = source
    self.spec = spec
    self.image_size = image_size
    self.caption = caption
    self.num_records = num_records

  def __call__(self, index, rng: np.random.Generator) -> dict[str, Any]:
    index = int(index)
    pad = index >= self.num_records  # single-pass padding row: any real example, dropped later
    ex = self.source[0 if pad else index]
    image = np.asarray(ex["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if self.image_size is not None:
      image = center_crop_resize(image, self.image_size)
    out = {"image": np.ascontiguousarray(image, np.uint8), "index": np.int64(-1 if pad else index)}
    if self.spec.has_label:
      out["label"] = np.int32(ex["label"])
    if self.spec.has_captions:
      texts = _caption_texts(ex)
      if not texts:
        out["caption"] = ""
      else:
        k = 0 if self.caption == "first" else int(rng.integers(len(texts)))
        out["caption"] = _to_str(texts[k])
    return out


def _stack(values: list) -> np.ndarray:
  first = values[0]
  if isinstance(first, str):
    return np.asarray(values, dtype=str)
  if isinstance(first, np.ndarray) and any(v.shape != first.shape for v in values):
    out = np.empty((len(values),), dtype=object)  # COCO images of different sizes
    for i, v in enumerate(values):
      out[i] = v
    return out
  return np.stack([np.asarray(v) for v in values])


def _batch_fn(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: _stack([e[k] for e in examples]) for k in examples[0]}


# ---------------------------------------------------------------------------------------------------------
# The resumable iterator
# ---------------------------------------------------------------------------------------------------------

def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bytes, bytearray)):
    return {"__bytes__": base64.b64encode(bytes(x)).decode("ascii")}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_jsonable(x):
  if isinstance(x, dict):
    if set(x) == {"__bytes__"}:
      return base64.b64decode(x["__bytes__"])
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x


class ResumableIterator(Iterator[dict[str, np.ndarray]]):
  """A per-process iterator of batches (dicts of numpy arrays) whose position is a JSON-able dict.

  ``get_state()`` → ``{'format', 'config', 'batches', 'grain'}``; ``set_state(state)`` checks that ``config``
  (dataset, split, seed, global batch size, epochs, image size, ...) matches this pipeline's and restores the
  grain iterator, so the next batches are exactly those the saved iterator would have produced next.
  ``num_batches`` is the number of batches per process of a finite stream (``None`` when infinite).
  """

  def __init__(self, grain_iter, config: dict[str, Any], num_batches: int | None, drop_padding: bool):
    self._it = grain_iter
    self.config = dict(config)
    self.num_batches = num_batches
    self.batches = 0
    self._drop_padding = drop_padding

  def __iter__(self):
    return self

  def __len__(self):
    if self.num_batches is None:
      raise TypeError("an infinite pipeline (num_epochs=None) has no length")
    return self.num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.batches += 1
    if self._drop_padding:
      keep = np.asarray(batch["index"]) >= 0
      if not keep.all():
        batch = {k: v[keep] for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    state = {"format": STATE_FORMAT, "config": dict(self.config), "batches": self.batches,
             "grain": _jsonable(self._it.get_state())}
    json.dumps(state)  # fail here, not when the checkpoint is written
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "grain" not in state:
      raise ValueError(f"not an input-pipeline state (format {STATE_FORMAT}): {str(state)[:200]}")
    saved = state.get("config", {})
    diff = {k: (saved.get(k), v) for k, v in self.config.items() if saved.get(k) != v}
    if diff:
      raise ValueError("the saved input-pipeline state belongs to a different pipeline; differing settings "
                       "(saved, now): " + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in sorted(diff.items())))
    self._it.set_state(_from_jsonable(state["grain"]))
    self.batches = int(state.get("batches", 0))

  def close(self):
    """Stops grain's threads and worker processes (call it when done with a ``worker_count > 0`` pipeline)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------

def make_image_pipeline(name: str, split: str, *, data_dir: str | os.PathLike | None, global_batch_size: int,
                        seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                        image_size: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, worker_count: int = 0,
                        drop_remainder: bool | None = None, caption: str = "random",
                        read_threads: int = 4, source=None) -> ResumableIterator:
  """This process's iterator of ``global_batch_size // process_count`` examples per batch (module docstring).

  Args:
    name: ``'cifar10'``, ``'imagenet_resized/64x64'`` or ``'coco_captions'``.
    split: a tfds split (``'train'``, ``'test'``, ``'validation'``, ``'val'``, ``'train[:1000]'``, ...).
    data_dir: the tfds data dir holding the prepared dataset (``None``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    global_batch_size: examples per step over all processes; a multiple of ``process_count``.
    seed: shuffle (per epoch) and caption-choice seed.
    shuffle, num_epochs: ``num_epochs=None`` repeats forever.
    image_size: centre-crop and resize to this square size (required to stack COCO images).
    process_index, process_count: this process's shard; default ``jax.process_index() / process_count()``.
    worker_count: grain worker processes (0: threads in this process).
    drop_remainder: drop the incomplete last global batch; default ``True`` except for a single unshuffled
      pass (``shuffle=False, num_epochs=1``), which keeps every example (shorter last batch).
    caption: COCO caption choice, ``'random'`` (seeded per example and epoch) or ``'first'``.
    read_threads: grain read threads per process.
    source: an already opened random-access source to use instead of ``tfds.data_source`` (tests, tools).
  """
  import grain

  key, spec = resolve_name(name)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_index, process_count = int(process_index), int(process_count)
  global_batch_size = int(global_batch_size)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the process count "
                     f"{process_count} (each process takes global_batch_size // process_count examples)")
  if num_epochs is not None and int(num_epochs) < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  if caption not in ("random", "first"):
    raise ValueError(f"caption must be 'random' or 'first', got {caption!r}")
  if image_size is not None and int(image_size) < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  local_batch = global_batch_size // process_count
  if drop_remainder is None:
    drop_remainder = shuffle or num_epochs is None
  if not drop_remainder and num_epochs is None:
    raise ValueError("drop_remainder=False needs a finite num_epochs")

  if source is None:
    source = open_source(key, split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {key!r} is empty")
  process = _Process(source, spec, None if image_size is None else int(image_size), caption, n)

  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if num_epochs is None or int(num_epochs) > 1:
    ds = ds.repeat(None if num_epochs is None else int(num_epochs))
  if drop_remainder:
    total = None if num_epochs is None else n * int(num_epochs)
    if total is not None and total < global_batch_size:
      raise ValueError(f"split {split!r} of {key!r} has {n} examples × {num_epochs} epochs, fewer than one "
                       f"global batch of {global_batch_size}")
    num_batches = None if total is None else total // global_batch_size
    if total is not None:  # cut the stream at a whole number of global batches
      ds = ds[:num_batches * global_batch_size]
  else:  # pad to whole global batches with index-past-the-end rows, dropped again by the iterator
    total = n * int(num_epochs)
    num_batches = math.ceil(total / global_batch_size)
    padded = num_batches * global_batch_size
    if padded > total:
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(n, n + padded - total)])
  ds = ds.random_map(process, seed=int(seed))
  ds = ds[process_index::process_count]
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_batch_fn)
  read = grain.ReadOptions(num_threads=max(int(read_threads), 1), prefetch_buffer_size=max(2 * local_batch, 1))
  ids = ds.to_iter_dataset(read)
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside an absl app: defaults)
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  config = {"name": key, "split": split, "seed": int(seed), "shuffle": bool(shuffle),
            "num_epochs": None if num_epochs is None else int(num_epochs),
            "global_batch_size": global_batch_size,
            "image_size": None if image_size is None else int(image_size),
            "drop_remainder": bool(drop_remainder), "caption": caption, "num_records": n,
            "worker_count": int(worker_count)}
  if worker_count > 0:  # worker states are per process layout
    config.update(process_index=process_index, process_count=process_count)
  logging.info("input pipeline %s[%s]: %d records, global batch %d (%d on process %d/%d), %s batches",
               key, split, n, global_batch_size, local_batch, process_index, process_count,
               "infinite" if num_batches is None else num_batches)
  return ResumableIterator(iter(ids), config, num_batches, drop_padding=not drop_remainder)


def make_single_pass_pipeline(name: str, split: str, *, data_dir, global_batch_size: int, **kwargs
                              ) -> ResumableIterator:
  """Every example of ``split`` exactly once across processes, in record order (shorter last batch)."""
  return make_image_pipeline(name, split, data_dir=data_dir, global_batch_size=global_batch_size,
                             shuffle=False, num_epochs=1, **kwargs)
