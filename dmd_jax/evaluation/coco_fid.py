"""COCO-30k FID image preparation (docs/method.md §8): the protocol of the DMD / DMD2 / GigaGAN text-to-image
numbers.

1. ``center_crop_resize``: each image (generated, or a COCO val2014 reference) is center-cropped to a square
   on its short side (torchvision's ``center_crop`` arithmetic, offset ``int(round((size - side) / 2))``)
   and resized to 256×256 with PIL Lanczos (uint8, as the GigaGAN / DMD2 evaluation code does);
2. ``clean_resize``: clean-fid's "clean" resize to 299×299 — each channel as a float32 PIL ``F`` image,
   bicubic, clipped to [0, 255], no quantisation;
3. the FID Inception-v3 on those float32 pixels with clean-fid's normalisation ``(x - 128) / 128`` and no
   further resize: ``fid.inception_features(..., protocol='clean')``.

    feats = clean_fid_features(module, params, images_uint8_nhwc)        # steps 1–3, [N, 2048]
    stats = fid.FeatureStats(); stats.update(feats); mu, sigma = stats.mu_sigma()

The same function prepares the reference set (40,504 COCO val2014 images) and the generated set, so the two
sides of the Fréchet distance go through identical resizes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from dmd_jax.evaluation import fid
from dmd_jax.evaluation import images as image_io

COCO_SIZE = 256


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  """The square crop on the short side, as ``torchvision.transforms.functional.center_crop(img, min(size))``:
  ``(left, top, right, bottom)`` with offsets ``int(round((side - short) / 2))`` (round half to even)."""
  s = min(width, height)
  top = int(round((height - s) / 2.0))
  left = int(round((width - s) / 2.0))
  return left, top, left + s, top + s


def center_crop_resize(image, size: int = COCO_SIZE) -> np.ndarray:
  """One image (PIL or uint8 HWC) → uint8 ``[size, size, 3]``: square center crop, PIL Lanczos resize."""
  img = image_io.to_pil_rgb(image)
  img = img.crop(center_crop_box(*img.size))
  if img.size != (size, size):
    img = img.resize((size, size), resample=Image.LANCZOS)
  return np.asarray(img)


def clean_resize(image: np.ndarray, size: int = fid.INCEPTION_SIZE) -> np.ndarray:
  """clean-fid's "clean" resize of one uint8 (or float) HWC RGB image → float32 ``[size, size, 3]`` in
  [0, 255]: each channel as a float32 PIL ``F`` image, bicubic, clipped to [0, 255]."""
  a = np.asarray(image)
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ValueError(f"clean_resize takes an HWC RGB image, got shape {a.shape}")
  chans = []
  for c in range(3):
    ch = Image.fromarray(np.ascontiguousarray(a[:, :, c].astype(np.float32)), mode="F")
    ch = ch.resize((size, size), resample=Image.BICUBIC)
    chans.append(np.asarray(ch, np.float32).clip(0, 255).reshape(size, size, 1))
  return np.concatenate(chans, axis=2).astype(np.float32)


def prepare_images(images: Sequence[Any] | np.ndarray, crop_size: int = COCO_SIZE) -> np.ndarray:
  """Steps 1 and 2 for a batch: PIL images or uint8 NHWC → float32 ``[N, 299, 299, 3]`` in [0, 255]."""
  out = [clean_resize(center_crop_resize(im, crop_size)) for im in images]
  if not out:
    return np.zeros((0, fid.INCEPTION_SIZE, fid.INCEPTION_SIZE, 3), np.float32)
  return np.stack(out)


def clean_fid_features(module, params, images, crop_size: int = COCO_SIZE, chunk: int = 1000,
                       **kwargs) -> np.ndarray:
  """Inception features ``[N, 2048]`` of PIL / uint8 images under the COCO protocol (crop, Lanczos 256,
  clean resize 299, ``(x - 128) / 128``). Prepares ``chunk`` images at a time on the host; ``kwargs`` go to
  ``fid.inception_features`` (``batch_size``, ``mesh``, ``gather``, ...)."""
  feats = []
  for i in range(0, len(images), chunk):
    x = prepare_images(images[i:i + chunk], crop_size)
    feats.append(fid.inception_features(module, params, x, protocol="clean", **kwargs))
  return np.concatenate(feats) if feats else np.zeros((0, fid.FEATURE_DIM), np.float32)
