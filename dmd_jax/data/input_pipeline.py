"""Prepared tfds datasets, read with ``tensorflow_datasets.data_source`` (ArrayRecord, random access, no
TensorFlow): the training sources of ``data/real.py`` (indexed by step, ``data/indexed.py``), the captions of
COCO (``coco_captions``: training prompts, text-to-image evaluation) and one pass over a split in record order
(:func:`make_single_pass_pipeline`: FID reference statistics).

Datasets (prepared once by the user into ``data_dir`` in the ArrayRecord format; nothing is downloaded here):

===========================  ================================  ===========================================
name                         tfds dataset                      each example
===========================  ================================  ===========================================
``cifar10``                  ``cifar10``                       ``image`` uint8 [32, 32, 3], ``label`` int32
``imagenet_resized/64x64``   ``imagenet_resized/64x64``        ``image`` uint8 [64, 64, 3], ``label`` int32
``coco_captions``            ``coco_captions/2014``            ``image`` uint8 [H, W, 3], ``caption`` str
===========================  ================================  ===========================================

**Single pass.** Every example of the split exactly once across processes, in record order, with ``index``
(int64): its record index within the split, and a COCO example's first caption. ``image_size`` centre-crops
to a square and resizes (PIL bicubic) to ``image_size × image_size``; COCO images vary in size, so without
``image_size`` a COCO batch's ``image`` is an object array of ``[H, W, 3]`` arrays. Batch ``b`` is records
``[b·G, (b+1)·G)`` (``G``: the global batch size), of which process ``p`` of ``P`` reads ``b·G + p + P·j``
(``j < G/P``); the last batch is shorter. Every process yields the same number of batches (a process may get
a shorter, even empty, last batch), so per-batch collectives stay aligned.

    it = make_single_pass_pipeline('cifar10', 'test', data_dir='~/tensorflow_datasets', global_batch_size=512)
    for batch in it:                 # {'image': uint8 [<= 512/P, 32, 32, 3], 'label': int32, 'index': int64}
      ...

Preparing a dataset (once, on a machine with TensorFlow; ImageNet needs its manual download)::

    tfds build cifar10 --data_dir=DATA_DIR --file_format=array_record
    # or: tfds.builder('cifar10', data_dir=DATA_DIR, file_format='array_record').download_and_prepare()
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath  # local folders and gs:// alike
from PIL import Image

from dmd_jax.data.indexed import parallel_map


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
  out = Image.fromarray(np.ascontiguousarray(image, np.uint8)).resize((size, size), Image.BICUBIC)
  return np.asarray(out, np.uint8)


def _example(source, spec: DatasetSpec, image_size: int | None, index: int, num_records: int) -> dict[str, Any]:
  """Record ``index`` as ``{'image', 'index', 'label' | 'caption'}`` (the first caption); ``index >= num_records``:
  a padding row (record 0 with index -1), dropped again by :class:`SinglePass`."""
  pad = index >= num_records
  ex = source[0 if pad else index]
  image = np.asarray(ex["image"])
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image_size is not None:
    image = center_crop_resize(image, image_size)
  out = {"image": np.ascontiguousarray(image, np.uint8), "index": np.int64(-1 if pad else index)}
  if spec.has_label:
    out["label"] = np.int32(ex["label"])
  if spec.has_captions:
    texts = _caption_texts(ex)
    out["caption"] = _to_str(texts[0]) if texts else ""
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


# ---------------------------------------------------------------------------------------------------------
# The single pass
# ---------------------------------------------------------------------------------------------------------

class SinglePass:
  """This process's batches of one pass over a split in record order (module docstring); ``len()`` batches,
  the same on every process. ``config`` says what the pass is (``num_records``: the split's size)."""

  def __init__(self, source, spec: DatasetSpec, config: dict[str, Any], image_size: int | None,
               process_index: int, process_count: int):
    self.source, self.spec, self.config, self.image_size = source, spec, dict(config), image_size
    self.process_index, self.process_count = process_index, process_count
    n, g = config["num_records"], config["global_batch_size"]
    self.num_batches = -(-n // g)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    n, g = self.config["num_records"], self.config["global_batch_size"]
    local = g // self.process_count
    for b in range(self.num_batches):
      positions = b * g + self.process_index + self.process_count * np.arange(local)
      examples = parallel_map(
          lambda i: _example(self.source, self.spec, self.image_size, int(i), n), positions.tolist())
      batch = {k: _stack([e[k] for e in examples]) for k in examples[0]}
      keep = batch["index"] >= 0
      yield batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def make_single_pass_pipeline(name: str, split: str, *, data_dir: str | os.PathLike | None,
                              global_batch_size: int, image_size: int | None = None,
                              process_index: int | None = None, process_count: int | None = None,
                              source=None) -> SinglePass:
  """Every example of ``split`` exactly once across processes, in record order (shorter last batch).

  Args:
    name: ``'cifar10'``, ``'imagenet_resized/64x64'`` or ``'coco_captions'``.
    split: a tfds split (``'train'``, ``'test'``, ``'validation'``, ``'val'``, ``'train[:1000]'``, ...).
    data_dir: the tfds data dir holding the prepared dataset (``None``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    global_batch_size: examples per batch over all processes; a multiple of ``process_count``.
    image_size: centre-crop and resize to this square size (required to stack COCO images).
    process_index, process_count: this process's share; default ``jax.process_index() / process_count()``.
    source: an already opened random-access source to use instead of ``tfds.data_source`` (tests, tools).
  """
  key, spec = resolve_name(name)
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_index, process_count = int(process_index), int(process_count)
  global_batch_size = int(global_batch_size)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the process count "
                     f"{process_count} (each process takes global_batch_size // process_count examples)")
  if image_size is not None and int(image_size) < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  if source is None:
    source = open_source(key, split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {key!r} is empty")
  config = {"name": key, "split": split, "global_batch_size": global_batch_size, "num_records": n,
            "image_size": None if image_size is None else int(image_size)}
  it = SinglePass(source, spec, config, config["image_size"], process_index, process_count)
  logging.info("single pass over %s[%s]: %d records, global batch %d (%d on process %d/%d), %d batches",
               key, split, n, global_batch_size, global_batch_size // process_count, process_index,
               process_count, len(it))
  return it
