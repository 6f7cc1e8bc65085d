"""FID: Inception features data-parallel over all devices and hosts, float64 statistics, Fréchet distance.

Two resize/normalise protocols feed the FID Inception-v3 (``dmd_jax.models.inception``):

- ``'tf1'`` — TF-FID / EDM, the protocol behind the EDM, DMD and DMD2 CIFAR-10 and ImageNet-64 numbers: uint8
  image, TF1 bilinear resize to 299 *without* half-pixel centres (source coordinate ``= dst · in/out``),
  then ``(x - 128) / 128``;
- ``'pytorch_fid'`` — pytorch-fid: ``x / 255``, bilinear resize with ``align_corners=False`` (half-pixel
  centres), then ``2x - 1``.

At 32–64 px the two resizes differ by about half a source pixel, which moves FID: compare numbers only
within one protocol. A third protocol takes images resized on the host:

- ``'clean'`` — clean-fid's default ("clean" mode, the COCO protocol of docs/method.md §8): the caller resizes
  each channel to 299×299 with PIL bicubic as float32 ``F`` images and clips to [0, 255]
  (``dmd_jax.evaluation.coco_fid.clean_resize``); the network gets those float32 pixels with clean-fid's
  normalisation ``(x - 128) / 128`` (its ``InceptionV3W`` with ``resize_inside=False``) and no resize.

Feature extraction is one ``jax.jit`` over a ``Mesh`` with axes ``('data', 'fsdp')``: the batch is sharded
over both axes, the parameters are replicated, the last partial batch is padded and its rows dropped, and
the network runs with ``precision=HIGHEST``. Each process passes its own images; features are gathered
across processes with ``jax.experimental.multihost_utils``.

    module, params = load_converted_inception('weights/inception_fid')
    stats = FeatureStats()
    for images in batches_of_uint8_samples:             # [n, H, W, 3] on this host
      stats.update(inception_features(module, params, images))
    mu, sigma = stats.mu_sigma()
    ref = load_reference_stats('fid-refs/cifar10-32x32.npz')
    fid = frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmd_jax import io, loop, sharding
from dmd_jax.sharding import BATCH_AXES

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
PROTOCOLS = ("tf1", "pytorch_fid", "clean")


# ---------------------------------------------------------------------------------------------------------
# Resize and normalisation
# ---------------------------------------------------------------------------------------------------------

def bilinear_matrix(in_size: int, out_size: int, half_pixel_centers: bool) -> np.ndarray:
  """``[out, in]`` interpolation weights of a 1-D bilinear resize (no antialiasing), float32.

  ``half_pixel_centers=False`` is TF1's ``resize_bilinear`` (source ``= dst · in/out``);
  ``True`` is ``F.interpolate(mode='bilinear', align_corners=False)`` (source
  ``= max((dst + 0.5) · in/out - 0.5, 0)``). Both clamp the upper neighbour to the last pixel.
  """
  # Source coordinates in float32 arithmetic, as TF1 and PyTorch compute them (float64 coordinates move
  # the 0..255 result by up to ~3e-4).
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if half_pixel_centers:
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
  else:
    src = dst * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float64)
  w = np.zeros((out_size, in_size), np.float64)
  np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(w, (np.arange(out_size), hi), frac)
  return w.astype(np.float32)


def bilinear_resize(x: jax.Array, size: int, half_pixel_centers: bool) -> jax.Array:
  """Separable bilinear resize of NHWC ``x`` to ``size × size`` as two exact float32 matmuls."""
  _, h, w, _ = x.shape
  if h != size:
    x = jnp.einsum("oh,nhwc->nowc", bilinear_matrix(h, size, half_pixel_centers), x,
                   precision=jax.lax.Precision.HIGHEST)
  if w != size:
    x = jnp.einsum("ow,nhwc->nhoc", bilinear_matrix(w, size, half_pixel_centers), x,
                   precision=jax.lax.Precision.HIGHEST)
  return x


def tf1_resize(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """TF1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centres) of NHWC images, float32."""
  return bilinear_resize(jnp.asarray(images, jnp.float32), size, half_pixel_centers=False)


def preprocess(images: jax.Array, protocol: str = "tf1") -> jax.Array:
  """uint8 NHWC images of any size → the Inception input ``[N, 299, 299, 3]`` in [-1, 1] for ``protocol``
  (``'clean'``: float32 pixels in [0, 255] already resized to 299×299)."""
  x = jnp.asarray(images, jnp.float32)
  if protocol == "clean":
    if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
      raise ValueError(f"the 'clean' FID protocol takes images already resized to {INCEPTION_SIZE}x"
                       f"{INCEPTION_SIZE} on the host (coco_fid.clean_resize), got shape {x.shape}")
    return (x - 128.0) / 128.0
  if protocol == "tf1":
    return (tf1_resize(x) - 128.0) / 128.0
  if protocol == "pytorch_fid":
    return 2.0 * bilinear_resize(x / 255.0, INCEPTION_SIZE, half_pixel_centers=True) - 1.0
  raise ValueError(f"unknown FID protocol {protocol!r}: expected one of {PROTOCOLS}")


# ---------------------------------------------------------------------------------------------------------
# Features, data-parallel over the mesh
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _compiled_features(module, protocol: str, mesh: Mesh):
  """The one jitted step: uint8 batch (sharded over data × fsdp) → features (same sharding)."""
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)

  def features(params, images):
    return module.apply({"params": params}, preprocess(images, protocol)).astype(jnp.float32)

  return jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch)


def _with_precision(module, precision):
  if precision is not None and getattr(module, "precision", precision) != precision:
    return module.clone(precision=precision)
  return module


def inception_features(module, params: Any, images: np.ndarray, protocol: str = "tf1",
                       batch_size: int = 256, mesh: Mesh | None = None, gather: bool = True,
                       precision=jax.lax.Precision.HIGHEST, log_every: int = 20) -> np.ndarray:
  """Inception pool features of uint8 NHWC ``images`` (any size) under ``protocol``: ``[N, 2048]`` float32.

  Args:
    module, params: from ``dmd_jax.convert.inception`` (``convert_state_dict`` or
      ``load_converted_inception``). Host arrays are replicated over the mesh on every call; when calling
      once per chunk of samples, place them once with ``jax.device_put(params, NamedSharding(mesh, P()))``.
    images: this process's images, uint8 ``[n, H, W, 3]`` (``[n, H, W, 1]`` is repeated to 3 channels);
      for ``'clean'``, float32 ``[n, 299, 299, 3]`` in [0, 255] from ``coco_fid.clean_resize``.
    protocol: ``'tf1'`` (TF-FID / EDM / DMD), ``'pytorch_fid'`` or ``'clean'`` (clean-fid).
    batch_size: global images per step (all devices and hosts); rounded up to a multiple of the device count.
    mesh: a ``('data', 'fsdp')`` mesh; default every device along ``data``.
    gather: with several processes, return every process's features (in process order) on every
      process; ``False`` returns this process's only. One process: the same thing.
    precision: matmul/conv precision the network runs with (``HIGHEST`` for FID; ``None`` keeps the
      module's).
    log_every: absl-log progress (images/s) every this many steps; 0 turns it off.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown FID protocol {protocol!r}: expected one of {PROTOCOLS}")
  images = np.asarray(images)
  if protocol == "clean":
    if images.dtype != np.float32 or images.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
      raise ValueError(f"the 'clean' FID protocol takes float32 images already resized to {INCEPTION_SIZE}x"
                       f"{INCEPTION_SIZE} (coco_fid.clean_resize), got {images.dtype} {images.shape}")
  elif images.dtype != np.uint8:
    raise ValueError(f"FID images must be uint8 (got {images.dtype}); convert with "
                     "np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8) from [-1, 1]")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"FID images must be NHWC with 1 or 3 channels, got shape {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)

  mesh = sharding.make_mesh() if mesh is None else mesh
  if tuple(mesh.axis_names) != BATCH_AXES:
    raise ValueError(f"expected a mesh with axes {BATCH_AXES}, got {mesh.axis_names}")
  n_proc = jax.process_count()
  n_dev = mesh.devices.size
  batch_size = -(-max(int(batch_size), 1) // n_dev) * n_dev
  local_batch = batch_size // n_proc
  n_local = images.shape[0]
  counts = [n_local]
  if n_proc > 1:  # every process must run the same number of steps.
    counts = [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int64(n_local)))]
  n_steps = -(-max(counts) // local_batch)

  module = _with_precision(module, precision)
  step = _compiled_features(module, protocol, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  global_shape = (batch_size,) + images.shape[1:]

  def to_global(chunk):
    if n_proc == 1:
      return jax.device_put(chunk, batch_sharding)
    return jax.make_array_from_process_local_data(batch_sharding, chunk, global_shape)

  def to_local(out):
    if n_proc == 1:
      return np.asarray(out)
    return np.asarray(multihost_utils.global_array_to_host_local_array(out, mesh, P(BATCH_AXES)))

  feats, pending = [], None
  progress = loop.Progress("FID features:", n_steps, unit="batches")
  for i in range(n_steps):
    chunk = images[i * local_batch:(i + 1) * local_batch]
    n_valid = chunk.shape[0]
    if n_valid < local_batch:  # pad the last (or an empty) batch; the padded rows are dropped below.
      pad = np.zeros((local_batch - n_valid,) + images.shape[1:], images.dtype)
      chunk = np.concatenate([chunk, pad], axis=0)
    out = step(params, to_global(chunk))  # dispatched asynchronously
    if pending is not None:  # fetch the previous step while this one runs
      feats.append(to_local(pending[0])[:pending[1]])
    pending = (out, n_valid)
    if log_every and (i + 1) % log_every == 0 and jax.process_index() == 0:
      progress.update(i + 1, f"~{min((i + 1) * local_batch, n_local) * n_proc} images")
  if pending is not None:
    feats.append(to_local(pending[0])[:pending[1]])
  local = np.concatenate(feats, axis=0) if feats else np.zeros((0, FEATURE_DIM), np.float32)
  local = local[:n_local]

  if n_proc == 1 or not gather:
    return local
  width = max(counts)
  padded = np.zeros((width, local.shape[1]), np.float32)
  padded[:n_local] = local
  every = np.asarray(multihost_utils.process_allgather(padded))  # [n_proc, width, 2048]
  return np.concatenate([every[p, :c] for p, c in enumerate(counts)], axis=0)


# ---------------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance (float64, on the host)
# ---------------------------------------------------------------------------------------------------------

class FeatureStats:
  """Streaming ``Σx`` and ``Σxxᵀ`` in float64; ``mu_sigma()`` gives the mean and unbiased covariance."""

  def __init__(self, dim: int = FEATURE_DIM):
    self.dim = dim
    self.count = 0
    self.sum = np.zeros((dim,), np.float64)
    self.sum_outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64).reshape(-1, self.dim)
    self.count += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x

  def merge(self, other: "FeatureStats") -> None:
    if other.dim != self.dim:
      raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
    self.count += other.count
    self.sum += other.sum
    self.sum_outer += other.sum_outer

  def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
    mu = self.sum / self.count
    sigma = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma


def compute_statistics(module, params, images: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` of the Inception features of ``images`` (kwargs as ``inception_features``)."""
  stats = FeatureStats()
  stats.update(inception_features(module, params, images, **kwargs))
  return stats.mu_sigma()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """``‖mu1 - mu2‖² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)`` in float64.

  ``tr((S1 S2)^½) = Σ √λ`` over the eigenvalues of the symmetric ``√S1 S2 √S1`` (``eigh``), which equal those
  of ``S1 S2``. (``eigvalsh(S1 @ S2)`` would be wrong: the product is not symmetric.)
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                     f"sigma2 {s2.shape}")
  s1 = (s1 + s1.T) / 2
  s2 = (s2 + s2.T) / 2
  r1 = _sqrt_psd(s1)
  m = r1 @ s2 @ r1
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def load_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """``{'mu', 'sigma'}`` (float64) from an ``.npz`` such as EDM's ``fid-refs/*.npz`` or pytorch-fid's."""
  path = os.fspath(path)
  if not io.exists(path):
    raise FileNotFoundError(f"FID reference statistics {path!r} not found")
  try:
    contents = io.load_npz(path)
  except Exception as e:  # not an npz
    raise ValueError(f"FID reference statistics {path!r} are not a readable .npz file: {e}") from e
  missing = [k for k in ("mu", "sigma") if k not in contents]
  if missing:
    raise ValueError(f"FID reference statistics {path!r} lack {', '.join(map(repr, missing))} "
                     f"(keys present: {sorted(contents)})")
  mu, sigma = np.asarray(contents["mu"], np.float64), np.asarray(contents["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"FID reference statistics {path!r}: mu {mu.shape} and sigma {sigma.shape} do not "
                     "match")
  return {"mu": mu, "sigma": sigma}


def save_reference_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes ``mu`` and ``sigma`` (float64) to an ``.npz`` that ``load_reference_stats`` (and EDM) read."""
  io.write_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
