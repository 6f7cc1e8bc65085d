"""Image outputs: [-1, 1] floats → uint8 (EDM's convention), and PNG grids of samples."""
from __future__ import annotations

import numpy as np
from PIL import Image

from dmd_jax import io


def to_uint8(x) -> np.ndarray:
  """``uint8(clip(x * 127.5 + 128, 0, 255))`` for NHWC images in [-1, 1] (EDM's generate.py)."""
  return np.clip(np.asarray(x, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def grid(images: np.ndarray, cols: int) -> np.ndarray:
  """uint8 NHWC → one uint8 HWC grid with a 2-pixel white border between tiles."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, cols)
    out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = im
  return out


def save_png(path: str, image_hwc: np.ndarray) -> None:
  """Writes a uint8 HWC image (1 or 3 channels) as a PNG, atomically (local or ``gs://``)."""
  img = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
  with io.atomic_write(path) as f:
    Image.fromarray(img).save(f, format="PNG")


def to_pil_rgb(image, what: str = "images"):
  """A PIL RGB image from a PIL image (any mode) or a uint8 HW / HWC (1 or 3 channels) array; ``what`` names
  the images in errors."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8 arrays or PIL images, got {a.dtype} (convert [-1, 1] floats with "
                     "dmd_jax.evaluation.images.to_uint8)")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    return Image.fromarray(a, "L").convert("RGB")
  if a.ndim != 3 or a.shape[-1] != 3:
    raise ValueError(f"{what} must be HWC with 1 or 3 channels, got shape {a.shape}")
  return Image.fromarray(a, "RGB")

