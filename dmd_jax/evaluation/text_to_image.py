"""Text-to-image evaluation (docs/method.md §8): COCO-30k FID (clean-fid protocol) and CLIP score.

For each caption ``i`` of the evaluation set, one image is generated from the noise ``fold_in(key(seed), i)``
(the noise ``--mode=sample --prompt`` uses for image ``i``), conditioned on the caption's text embedding, and
decoded by the VAE — data-parallel over the mesh, in chunks, so 30k captions never sit on a device at once. On
the host each chunk goes

* to FID: square centre crop, PIL Lanczos to 256, clean-fid's float bicubic resize to 299
  (``coco_fid.prepare_images``), FID Inception under the ``'clean'`` protocol, float64 running statistics;
* to the CLIP score: ``100 · max(cos(image, "A photo depicts " + caption), 0)`` with a converted CLIPModel
  (OpenCLIP ViT-g/14 in the DMD papers), optionally after the same Lanczos-256 step as the GigaGAN / DMD2
  evaluation code (``clip_resize_256``).

Captions (``evals.coco.captions``): ``'coco_captions'`` — the first caption of each of the first ``num_samples``
images of a prepared tfds ``coco_captions/2014`` split, in record order (``evals.coco.captions_split``; the 2014
validation images are tfds's ``val+test+restval``, 40,504 images), read once and cached as a text file in the
workdir; ``'train_prompts'`` — the training prompts, cycled; or a path to a text file, one caption a line (for
instance the exact 30k-caption list a paper used). Reference statistics (``evals.coco.reference_stats``): an ``.npz``
with ``mu`` / ``sigma``; ``'tfds'`` — every image of ``evals.coco.reference_split`` of ``coco_captions`` under the
same protocol (``reference_stats.reference_stats_from_tfds``, cached); or ``'teacher'`` — the teacher's own
guided samples for the same captions (FID to the teacher), cached.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

from dmd_jax import io, loop, sharding
from dmd_jax.data import input_pipeline
from dmd_jax.data.prompts import read_prompts_file
from dmd_jax.evaluation import clip_score as clip_lib
from dmd_jax.evaluation import coco_fid, fid
from dmd_jax.evaluation import images as image_io

def coco_captions(data_dir: str, split: str, num: int, cache_dir: str | None) -> list[str]:
  """The first caption of each of the first ``num`` images of ``split`` (record order), cached as
  ``<cache_dir>/coco_captions_<split>_<num>.txt`` (one a line)."""
  cache = io.join(cache_dir, f"coco_captions_{split_tag(split)}_{num}.txt") if cache_dir else None
  if cache and io.exists(cache):
    return read_captions(cache)
  captions = input_pipeline.coco_captions(split, data_dir or None, first_only=True, limit=num)
  if cache and jax.process_index() == 0:
    io.write_text(cache, "\n".join(captions) + "\n")
  return captions


def read_captions(path: str) -> list[str]:
  """One caption a line (``evals.coco.captions=FILE``; whitespace stripped, blank lines skipped)."""
  return read_prompts_file(path, "evals.coco.captions")


def split_tag(split: str) -> str:
  """A tfds split expression as a file-name part: ``val+test+restval`` → ``val-test-restval``."""
  return split.replace("+", "-").replace("[", "_").replace(":", "_").replace("]", "")


def captions_digest(captions: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()[:16]


def caption_images(teacher, frozen, mesh, fn: Callable, params, captions: Sequence[str], key,
                   chunk: int) -> Iterator[tuple[np.ndarray, list[str]]]:
  """Yields ``(uint8 images [c, H, W, 3], their captions)`` for ``captions`` in order: image ``i`` is
  ``decode(fn(params, z_i, embed(caption_i), k_i))`` with ``z_i`` drawn from ``fold_in(key, i)`` and ``k_i``
  (a multi-step generator's further noise) ``fold_in(fold_in(key, i), 1)``. ``fn`` is ``run.sample`` (with the
  generator's params) or ``sampling.teacher_fn(run)`` (with ``frozen['teacher']``). Chunks are padded to a multiple of the device count; padding rows are dropped."""
  batch = sharding.batch_sharding(mesh)
  n_dev = mesh.devices.size
  chunk = -(-max(1, min(chunk, len(captions))) // n_dev) * n_dev

  @jax.jit
  def one(params, frozen, idx, cond):
    z = jax.vmap(lambda i: teacher.sample_noise(jax.random.fold_in(key, i), 1)[0])(idx)
    z = jax.lax.with_sharding_constraint(z, batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), 1))(idx)
    return jax.lax.with_sharding_constraint(teacher.decode(frozen, fn(params, z, cond, keys)), batch)

  for start in range(0, len(captions), chunk):
    caps = list(captions[start:start + chunk])
    m = len(caps)
    cond = np.asarray(teacher.conditions.encode_text(caps + [caps[-1]] * (chunk - m)), np.float32)
    idx = np.arange(start, start + chunk, dtype=np.int32)
    x = one(params, frozen, jax.device_put(idx, batch), jax.device_put(cond, batch))
    yield image_io.to_uint8(sharding.gather(x)[:m]), caps


class CocoEvaluator:
  """Accumulates FID statistics and CLIP scores over generated chunks (``update``), then ``result``."""

  def __init__(self, mesh, inception, clip=None, batch_size: int = 64, clip_resize_256: bool = True,
               image_size: int = coco_fid.COCO_SIZE):
    self.mesh, self.batch_size, self.clip_resize_256 = mesh, batch_size, clip_resize_256
    self.image_size = image_size   # the FID's centre crop + Lanczos size before the 299 resize (DMD2's --eval_res)
    self.inception, self.clip = inception, clip
    self.stats = fid.FeatureStats()
    self.scores: list[np.ndarray] = []

  def update(self, images: np.ndarray, captions: Sequence[str]) -> None:
    if self.inception is not None:   # every process holds the images; each feeds its share (gathered)
      module, params = self.inception
      share = images[sharding.process_share(len(images))]
      self.stats.update(coco_fid.clean_fid_features(module, params, share, self.image_size,
                                                    batch_size=self.batch_size, mesh=self.mesh, log_every=0))
    if self.clip is not None:
      module, params, tokenizer = self.clip
      self.scores.append(clip_lib.clip_scores(module, params, tokenizer, images, list(captions),
                                              batch_size=min(self.batch_size, len(images)),
                                              resize_256=self.clip_resize_256))

  @property
  def count(self) -> int:
    return self.stats.count if self.inception is not None else sum(len(s) for s in self.scores)

  def result(self, reference: tuple[np.ndarray, np.ndarray] | None) -> dict:
    out = {}
    if self.inception is not None and reference is not None:
      mu, sigma = self.stats.mu_sigma()
      out["fid"] = fid.frechet_distance(mu, sigma, *reference)
    if self.scores:
      out["clip_score"] = float(np.mean(np.concatenate(self.scores).astype(np.float64)))
    return out


def run(chunks: Iterator[tuple[np.ndarray, list[str]]], evaluator: CocoEvaluator, total: int,
        what: str) -> CocoEvaluator:
  """Feeds ``chunks`` to ``evaluator``, logging progress (``loop.Progress``)."""
  progress = loop.Progress(f"{what}:", total, unit="images")
  done = 0
  for images, caps in chunks:
    evaluator.update(images, caps)
    done += len(images)
    progress.update(done)
  return evaluator
