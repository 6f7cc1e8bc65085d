"""FID reference statistics of a tensorflow-datasets split, computed once and cached as an ``.npz``.

    module, params = load_converted_inception('weights/inception_fid')
    mu, sigma = reference_stats_from_tfds('cifar10', 'train', '~/tensorflow_datasets', module, params,
                                          batch_size=500, cache_path='fid-refs/cifar10-train-tf1.npz')

The split is streamed once, in record order, through ``dmd_jax.data.input_pipeline`` (each process reads a
disjoint shard; every example exactly once) and ``fid.inception_features`` (data-parallel over the mesh,
gathered across processes), and accumulated in float64 by ``fid.FeatureStats``. The result goes to
``cache_path`` with ``fid.save_reference_stats`` (``mu``, ``sigma``: the format of EDM's and pytorch-fid's
reference files) plus a small ``<cache_path>.json`` saying what it was computed from; when ``cache_path``
exists it is loaded instead (and checked against that ``.json`` when present).

Note: EDM's published CIFAR-10 reference (``cifar10-32x32.npz``) is the 50,000 *training* images under the TF1
protocol; ImageNet-64's is the training set as EDM's ``dataset_tool.py`` resized it, which ``imagenet_resized``
(box-resized by Chrabaszcz et al.) does not reproduce exactly. Prefer the published files where they exist.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dmd_jax import io, loop, sharding
from dmd_jax.data import input_pipeline
from dmd_jax.evaluation import coco_fid, fid


def _meta_path(cache_path: str) -> str:
  return cache_path + ".json"


def _read_meta(cache_path: str) -> dict | None:
  path = _meta_path(cache_path)
  return io.read_json(path) if io.exists(path) else None


def reference_stats_from_tfds(name: str, split: str, data_dir, inception_module, inception_params, *,
                              protocol: str = "tf1", batch_size: int, cache_path: str | os.PathLike,
                              max_examples: int | None = None, image_size: int | None = None,
                              mesh=None, log_every: int = 20) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` (float64) of the Inception features of every image of a tfds split, cached.

  Args:
    name, split, data_dir: as ``input_pipeline.make_single_pass_pipeline`` (``'cifar10'``,
      ``'imagenet_resized/64x64'``, ``'coco_captions'``; a prepared ArrayRecord dataset under ``data_dir``).
    inception_module, inception_params: the FID Inception (``dmd_jax.convert.inception``).
    protocol: ``'tf1'`` or ``'pytorch_fid'`` (``dmd_jax.evaluation.fid``).
    batch_size: images per step over all processes (a multiple of the process count).
    cache_path: the ``.npz`` to load when it exists, else to write.
    max_examples: use only the first this many examples of the split (``split[:max_examples]``).
    image_size: centre-crop and resize to this size first (required for COCO, whose sizes vary). Under the
      ``'clean'`` protocol (COCO FID, docs/method.md §8) the images are read as they are and prepared on the host
      by ``coco_fid.prepare_images`` — square centre crop, PIL Lanczos to ``image_size`` (default 256), then
      clean-fid's resize to 299 — exactly as generated images are.
    mesh: the ``('data', 'fsdp')`` mesh for the features; default every device along ``data``.
    log_every: log progress every this many batches.
  """
  cache_path = os.fspath(cache_path)
  key, spec = input_pipeline.resolve_name(name)
  if protocol not in fid.PROTOCOLS:
    raise ValueError(f"unknown FID protocol {protocol!r}: expected one of {fid.PROTOCOLS}")
  meta = {"name": key, "split": split, "protocol": protocol, "max_examples": max_examples,
          "image_size": image_size}
  if io.exists(cache_path):
    saved = _read_meta(cache_path)
    if saved is not None:
      diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
      if diff:
        raise ValueError(f"cached reference statistics {cache_path!r} were computed with different settings "
                         "(cached, asked): " + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items())
                         + "; delete the file or pass another cache_path")
    logging.info("FID reference statistics: loading the cached %s", cache_path)
    ref = fid.load_reference_stats(cache_path)
    return ref["mu"], ref["sigma"]

  clean = protocol == "clean"
  if clean and image_size is None:
    image_size = coco_fid.COCO_SIZE
    meta["image_size"] = image_size
  if spec.has_captions and image_size is None:
    raise ValueError(f"{key!r} images vary in size: pass image_size (centre crop + resize) for its FID "
                     "reference statistics")
  sub_split = split
  if max_examples is not None:
    if "[" in split:
      raise ValueError(f"give either a sliced split ({split!r}) or max_examples, not both")
    sub_split = f"{split}[:{int(max_examples)}]"

  mesh = sharding.make_mesh() if mesh is None else mesh
  params = jax.device_put(inception_params, NamedSharding(mesh, P()))  # placed once for every batch
  it = input_pipeline.make_single_pass_pipeline(key, sub_split, data_dir=data_dir,
                                                global_batch_size=batch_size,
                                                image_size=None if clean else image_size)
  total = it.config["num_records"]
  stats = fid.FeatureStats()
  progress = loop.Progress("FID reference statistics:", total, unit="images")
  logging.info("FID reference statistics of %s[%s] (%d images, protocol %s) → %s", key, sub_split, total,
               protocol, cache_path)
  for i, batch in enumerate(it):
    # Every process runs the same number of steps; features come back gathered from all processes.
    images = coco_fid.prepare_images(batch["image"], image_size) if clean else batch["image"]
    feats = fid.inception_features(inception_module, params, images, protocol=protocol,
                                   batch_size=batch_size, mesh=mesh, gather=True, log_every=0)
    stats.update(feats)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == len(it)) and jax.process_index() == 0:
      progress.update(stats.count)
  if stats.count != total:
    raise RuntimeError(f"reference statistics saw {stats.count} images, expected {total}")
  mu, sigma = stats.mu_sigma()
  if jax.process_index() == 0:
    _save(cache_path, mu, sigma, {**meta, "count": stats.count})
  logging.info("FID reference statistics: %d images in %.1f s, written to %s", stats.count,
               progress.seconds, cache_path)
  return mu, sigma


def _save(cache_path: str, mu, sigma, meta: dict) -> None:
  """The ``.json`` first, then the ``.npz`` (each atomic): once the statistics exist, their meta is right."""
  io.write_json(_meta_path(cache_path), meta)
  fid.save_reference_stats(cache_path, mu, sigma)
