"""CLIP score (docs/method.md §8): ``100 · max(cos(E_img(image), E_txt(prefix + caption)), 0)``, averaged.

The DMD / DMD2 COCO numbers use OpenCLIP ViT-g/14 (LAION-2B) on ``"A photo depicts " + caption``; the model
comes as a transformers ``CLIPModel`` folder (``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``) converted with
``python -m dmd_jax.convert clip``.

    module, params, tokenizer = load_converted_clip('weights/clip-vit-g-14')
    score = clip_score(module, params, tokenizer, images_uint8_nhwc, captions)

Image preprocessing (host, PIL) is ``transformers.CLIPImageProcessor``'s: RGB, bicubic resize of the shortest
side to 224 (long side ``int(224 · long / short)``), center crop 224 with offset ``(size - 224) // 2``, then
``x / 255`` normalised with the OpenAI CLIP mean / std (device, float32). Measured against
``CLIPImageProcessor`` (its PIL backend; the torchvision backend is the same resize when torchvision is
installed): bit-identical on PIL and uint8 inputs (tests/test_clip_score.py).

Differences from OpenCLIP's ``preprocess`` (``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor``,
``Normalize`` with the same OpenAI mean / std):

* the center crop: torchvision offsets by ``int(round((size - 224) / 2))`` (round half to even), transformers
  (and this module) by ``(size - 224) // 2``: when the resized long side minus 224 is odd and ≥ 3 the crop
  window sits one pixel apart. Square images (generated 512² samples, or the 256² Lanczos crops that the
  GigaGAN / DMD2 evaluation code feeds to CLIP) are resized straight to 224² and never cropped, so the two
  agree there;
* the resize itself is PIL's bicubic (antialiased) on uint8 in both, and the same output size;
* text: OpenCLIP's tokenizer pads with 0 where transformers' pads with its pad token; CLIP's causal mask
  and the pooling at the first end-of-text token make the features independent of the padding. OpenCLIP
  also runs ``ftfy`` text cleaning, which transformers' tokenizer does only when ``ftfy`` is installed.

The GigaGAN / DMD2 evaluation code first center-crops images to a square and resizes them to 256 with PIL
Lanczos (``coco_fid.center_crop_resize``), then applies OpenCLIP's preprocessing: pass
``resize_256=True`` to reproduce that.

Features and scores run as one ``jax.jit`` per batch shape (float32, ``precision=HIGHEST``); the last batch is
padded and its rows dropped.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dmd_jax.evaluation import images as image_io
from dmd_jax.evaluation.coco_fid import center_crop_resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_PREFIX = "A photo depicts "


# ---------------------------------------------------------------------------------------------------------
# Images (host: resize and crop with PIL; device: normalisation)
# ---------------------------------------------------------------------------------------------------------

def shortest_side_size(height: int, width: int, size: int = 224) -> tuple[int, int]:
  """``(new_height, new_width)`` with the shortest side ``size`` and the long side ``int(size · long /
  short)`` (transformers' ``get_resize_output_image_size(default_to_square=False)``, torchvision's Resize)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def resize_and_crop(image, size: int = 224) -> np.ndarray:
  """One image (PIL, or uint8 HWC) → uint8 ``[size, size, 3]``: bicubic shortest-side resize, center crop."""
  img = image_io.to_pil_rgb(image, "CLIP images")
  w, h = img.size
  nh, nw = shortest_side_size(h, w, size)
  if (nh, nw) != (h, w):
    img = img.resize((nw, nh), resample=Image.BICUBIC)
  a = np.asarray(img)
  top, left = (nh - size) // 2, (nw - size) // 2
  if top < 0 or left < 0:  # not reachable with a shortest-side resize; kept for safety
    raise ValueError(f"image {nh}x{nw} smaller than the crop {size}")
  return np.ascontiguousarray(a[top:top + size, left:left + size])


def preprocess_images(images: Sequence[Any] | np.ndarray, size: int = 224,
                      resize_256: bool = False) -> np.ndarray:
  """PIL images or uint8 NHWC arrays → uint8 ``[N, size, size, 3]`` (the resized, cropped pixels;
  :func:`normalize` finishes on the device). ``resize_256`` first center-crops to a square and resizes to
  256 with Lanczos, as the GigaGAN / DMD2 evaluation code does."""
  if resize_256:
    images = [center_crop_resize(image_io.to_pil_rgb(im, "CLIP images"), 256) for im in images]
  out = [resize_and_crop(im, size) for im in images]
  return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _normalize_table() -> np.ndarray:
  """``[256, 3]`` float32: every uint8 value of every channel after CLIPImageProcessor's rescale (float64
  ``v · (1/255)`` cast to float32) and normalize (``(x - mean) / std`` in float32), computed as it does."""
  x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


_TABLE = _normalize_table()


def normalize(pixels_uint8: jax.Array) -> jax.Array:
  """uint8 NHWC (3 channels) → ``(x / 255 - mean) / std`` in float32, bit for bit CLIPImageProcessor's
  (a table lookup: XLA's ``x / 255`` can differ from numpy's float64 rescale in the last bit)."""
  x = jnp.asarray(pixels_uint8)
  if x.dtype != jnp.uint8:
    raise ValueError(f"normalize takes uint8 pixels, got {x.dtype}")
  return jnp.asarray(_TABLE)[x.astype(jnp.int32), jnp.arange(3)]


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------

def tokenize(tokenizer, captions: Sequence[str], prefix: str = CAPTION_PREFIX,
             max_length: int | None = None) -> np.ndarray:
  """``prefix + caption`` → int32 ids ``[N, max_length]`` (padded, truncated with the end token kept);
  ``max_length`` defaults to the tokenizer's ``model_max_length`` (77 for CLIP)."""
  if isinstance(captions, str):
    raise TypeError("captions must be a sequence of strings, not one string")
  max_length = int(max_length or tokenizer.model_max_length)
  enc = tokenizer([prefix + c for c in captions], padding="max_length", max_length=max_length,
                  truncation=True, return_tensors="np")
  return np.asarray(enc["input_ids"], np.int32)


# ---------------------------------------------------------------------------------------------------------
# Features and the score (jitted)
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _compiled(module):
  def image_features(params, pixels_uint8):
    with jax.default_matmul_precision("highest"):
      return module.apply({"params": params}, normalize(pixels_uint8), method="get_image_features")

  def text_features(params, ids):
    with jax.default_matmul_precision("highest"):
      return module.apply({"params": params}, ids, method="get_text_features")

  def scores(params, pixels_uint8, ids):
    img = image_features(params, pixels_uint8)
    txt = text_features(params, ids)
    return per_sample_score(img, txt)

  return jax.jit(image_features), jax.jit(text_features), jax.jit(scores)


def per_sample_score(image_features, text_features):
  """``100 · max(cos, 0)`` per row, in float32."""
  img = jnp.asarray(image_features, jnp.float32)
  txt = jnp.asarray(text_features, jnp.float32)
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  return 100.0 * jnp.maximum(jnp.sum(img * txt, axis=-1), 0.0)


def _batched(fn, params, arrays, batch_size: int):
  n = arrays[0].shape[0]
  outs = []
  for i in range(0, n, batch_size):
    chunk = [a[i:i + batch_size] for a in arrays]
    m = chunk[0].shape[0]
    if m < batch_size and n > batch_size:  # pad the last batch to the compiled shape
      chunk = [np.concatenate([c, np.zeros((batch_size - m,) + c.shape[1:], c.dtype)]) for c in chunk]
    outs.append(np.asarray(fn(params, *chunk))[:m])
  return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def image_features(module, params, images, batch_size: int = 64, resize_256: bool = False) -> np.ndarray:
  """CLIP image features (unnormalised, transformers' ``get_image_features``) of PIL / uint8 images."""
  pixels = preprocess_images(images, module.config.vision.image_size, resize_256=resize_256)
  return _batched(_compiled(module)[0], params, [pixels], batch_size)


def text_features(module, params, tokenizer, captions, prefix: str = CAPTION_PREFIX,
                  batch_size: int = 64) -> np.ndarray:
  """CLIP text features (unnormalised, transformers' ``get_text_features``) of ``prefix + caption``."""
  ids = tokenize(tokenizer, captions, prefix, module.config.text.max_position_embeddings)
  return _batched(_compiled(module)[1], params, [ids], batch_size)


def clip_scores(module, params, tokenizer, images, captions, prefix: str = CAPTION_PREFIX,
                batch_size: int = 64, resize_256: bool = False) -> np.ndarray:
  """Per-pair ``100 · max(cos(image, prefix + caption), 0)``, float32 ``[N]``."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  pixels = preprocess_images(images, module.config.vision.image_size, resize_256=resize_256)
  ids = tokenize(tokenizer, captions, prefix, module.config.text.max_position_embeddings)
  return _batched(_compiled(module)[2], params, [pixels, ids], batch_size)


def clip_score(module, params, tokenizer, images, captions, prefix: str = CAPTION_PREFIX,
               batch_size: int = 64, resize_256: bool = False) -> float:
  """The CLIP score: the mean of :func:`clip_scores` (float64 accumulation)."""
  s = clip_scores(module, params, tokenizer, images, captions, prefix, batch_size, resize_256)
  if s.size == 0:
    raise ValueError("CLIP score of no images")
  return float(np.mean(s.astype(np.float64)))
