"""Tiny *real* prepared tfds datasets for the tests (no downloads, no TensorFlow): ``cifar10``,
``imagenet_resized/64x64`` and ``coco_captions/2014`` with the real builder names, versions and feature
structures, written as ArrayRecord into a data_dir by small builders (images passed as PIL-encoded PNG / JPEG
bytes, since tfds's own image encoder needs TensorFlow), so the real ``tfds.data_source`` read and decode path
runs."""
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

N_TRAIN = {"cifar10": 23, "imagenet_resized/64x64": 10, "coco_captions": 7}
N_TEST = {"cifar10": 11, "imagenet_resized/64x64": 6, "coco_captions": 5}


def _encoded(a: np.ndarray, fmt: str) -> io.BytesIO:
  b = io.BytesIO()
  Image.fromarray(a).save(b, format=fmt)
  b.seek(0)
  return b


def _cifar_like(builder, n, split_seed, size, with_id):
  rng = np.random.default_rng(split_seed)
  for i in range(n):
    ex = {"image": _encoded(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "PNG"), "label": i % 10}
    if with_id:
      ex["id"] = f"{split_seed}_{i}"
    yield i, ex


class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("3.0.2")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(N_TRAIN["cifar10"], 0),
            "test": self._generate_examples(N_TEST["cifar10"], 1)}

  def _generate_examples(self, n, seed):
    return _cifar_like(self, n, seed, 32, True)


class ImagenetResized(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("0.1.1")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="64x64")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(64, 64, 3)), "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(N_TRAIN["imagenet_resized/64x64"], 2),
            "validation": self._generate_examples(N_TEST["imagenet_resized/64x64"], 3)}

  def _generate_examples(self, n, seed):
    return _cifar_like(self, n, seed, 64, False)


def coco_features():
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "objects": tfds.features.Sequence({
          "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(num_classes=80), "is_crowd": np.bool_}),
      "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
  })


class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=coco_features())

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(N_TRAIN["coco_captions"], 4),
            "val": self._generate_examples(N_TEST["coco_captions"], 5)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
      yield i, {
          "image": _encoded(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "JPEG"),
          "image/filename": f"{seed}_{i}.jpg", "image/id": 1000 * seed + i,
          "objects": {"id": [i], "area": [h * w], "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)],
                      "label": [i % 80], "is_crowd": [False]},
          "captions": {"text": [f"caption {j} of image {seed}_{i}" for j in range(5)],
                       "id": [10 * i + j for j in range(5)]},
      }


def prepare(data_dir: str, builders=None) -> str:
  """Writes the datasets (default: all three) into ``data_dir``; returns it."""
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  for cls in builders or (Cifar10, ImagenetResized, CocoCaptions):
    b = cls(data_dir=data_dir, file_format="array_record", **({"config": cls.BUILDER_CONFIGS[0].name}
                                                               if cls.BUILDER_CONFIGS else {}))
    b.download_and_prepare(download_config=config)
  return data_dir
