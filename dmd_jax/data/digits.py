"""The digits that ship inside scikit-learn (``sklearn.datasets.load_digits``): 1,797 grayscale 8 × 8 images of
the digits 0–9 with 17 grey levels (0–16), the dataset of the CPU image-space proof (``configs/digits.py``,
docs/digits.md).

Images are scaled to [-1, 1] (``v / 8 - 1``) and resized to ``size`` × ``size`` (16 by default) with
``jax.image.resize(..., 'linear')``: bilinear interpolation with half-pixel centres (each 8 × 8 pixel covers
a 2 × 2 block of the 16 × 16 grid; edge pixels are clamped), the same resize for the teacher's training data,
the GAN critic's real samples and the metrics' reference set. Arrays are NHWC float32 ``[n, size, size, 1]``
with int32 labels.

Nothing is downloaded: the 8 × 8 digits are part of the scikit-learn wheel (the ``digits`` extra:
``pip install -e '.[digits]'``).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

NUM_IMAGES = 1797
NUM_CLASSES = 10
GREY_LEVELS = 16     # the raw values are 0..16


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise ImportError("the digits dataset comes with scikit-learn, which is not installed: "
                      "pip install -e '.[digits]' (or pip install scikit-learn)") from e
  d = load_digits()
  return np.asarray(d.images, np.float32), np.asarray(d.target, np.int32)


@functools.lru_cache(maxsize=4)
def load(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits: ``(images float32 [1797, size, size, 1] in [-1, 1], labels int32 [1797])``, in
  scikit-learn's order. ``size`` is 8 (no resize) or larger (bilinear, module docstring)."""
  if int(size) != size or size < 8:
    raise ValueError(f"digits image size must be an integer >= 8 (the originals are 8 x 8), got {size!r}")
  raw, labels = _load_raw()
  x = raw / (GREY_LEVELS / 2) - 1.0
  if size != 8:
    x = np.asarray(jax.image.resize(x, (len(x), size, size), "linear"), np.float32)
  x = np.clip(x, -1.0, 1.0)[..., None]
  x.setflags(write=False)
  labels.setflags(write=False)
  return x, labels


def split(held_out_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(train indices, held-out indices)``: a fixed stratified split (every class loses the same fraction,
  rounded), for the metrics' classifier; the teacher trains on all 1,797 images."""
  if not 0.0 < held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
  _, labels = load(8)
  rng = np.random.default_rng(seed)
  train, held = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    k = int(round(len(idx) * held_out_fraction))
    held.append(idx[:k])
    train.append(idx[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
