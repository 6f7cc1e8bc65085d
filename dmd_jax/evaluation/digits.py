"""Metrics of the digits proof (``data/digits.py``: scikit-learn's 1,797 8 × 8 digits at 16 × 16, [-1, 1],
10 classes): a small CNN classifier trained here on the digits, and five numbers computed with it.

The classifier
--------------
:class:`DigitsClassifier`: conv3×3 32 → conv3×3 64 stride 2 → conv3×3 128 stride 2 → flatten → Dense 128
(SiLU) → Dense 10. The Dense-128 activations are the **penultimate features** ``φ(x)`` every feature metric
uses: Inception features mean nothing on 16 × 16 grey digits, and a network trained on exactly this data
spends its 128 dimensions on what separates and shapes digits (stroke layout, class), not on pixel noise.
:func:`train_classifier` trains it on the train split of ``digits.split(held_out_fraction, seed)`` (Adam,
cosine-decayed learning rate, random ±1 px shifts with background padding) and reports the accuracy on the
held-out split. At the default ``DEFAULT_STEPS = 500`` (seed 0) it reaches **98.6 % held-out accuracy** (5
errors in 359 held-out digits) in about 19 s on two shared CPU cores; 80 steps give 96.9 % in 4.4 s.

It is cached in its folder (``<workdir>/digits_classifier`` for the evaluator): ``classifier_params.npz``
(flat ``conv0/kernel``-style keys) and ``classifier.json`` (the settings, held-out accuracy, train time),
written in that order, so ``classifier.json`` marks a finished classifier. A later call with the same settings
loads them; **a call with different settings raises a ValueError naming the differences** (the metrics are
only comparable under one classifier, so a folder holds one; delete it or use another folder). Training is
resumable: it runs in the project's one loop (``dmd_jax/loop.py``), which every ``checkpoint_every`` steps
writes an Orbax checkpoint to ``checkpoints/`` (params, Adam state; the settings and the train time so far in
its metadata); a killed training resumes from it, and the folder is removed once the classifier is written. The batch
of step ``s`` (its rows and shifts) is a pure function of ``(seed, s)`` (``np.random.default_rng([seed,
_ORDER_SALT, s])``), and the initial parameters of ``PRNGKey(seed)``, so the data order needs no state and a
resumed training ends with bitwise the parameters of an uninterrupted one. The classifier's seed is its own
(``digits.classifier_seed``, default 0), not ``config.seed``: every run measures with the same instrument.

The metrics (all in float64 on the host)
----------------------------------------
Samples are clipped to [-1, 1] first (what they are as images). ``φ`` = penultimate features.

* ``fid``: ``‖μ_g − μ_r‖² + tr Σ_g + tr Σ_r − 2 tr (Σ_g Σ_r)^½`` between the Gaussians fitted to ``φ`` of the
  samples and of the reference set (``fid.frechet_distance``; unbiased covariances). FID is biased upward at
  small sample counts, and the digits are few: compare values only within one table at equal sample counts,
  next to the real-vs-real floor (:func:`real_floor`). The evaluator therefore measures against half B of
  :func:`halves` (899 digits), the floor's reference, and ``configs/digits.py`` draws 898 samples, the size
  of the floor's half A: every row of the table has the same bias. (Against all 1,797 digits with 1,797
  samples the bias is about half: the teacher's FID is then below a floor measured at half size.) The feature
  scale, hence FID's, depends on the classifier: the floor is 16.6 with the default classifier, 4.2 with an
  80-step one.
* ``class_accuracy``: ``mean_i [argmax_c logits_c(x_i) = y_i]``, the fraction of class-conditional samples the
  classifier assigns to the label ``y_i`` they were generated for (None without labels).
* ``precision`` / ``recall``: k-NN manifolds (Kynkäänniemi et al. 2019, k = 3), Euclidean in ``φ``. With
  ``r_k(a, A)`` the distance from ``a`` to its k-th nearest neighbour in ``A`` (``a`` itself excluded),
  ``precision = mean_{g∈G} [∃ r∈R: ‖g − r‖ ≤ r_k(r, R)]`` (samples inside the union of the real balls) and
  ``recall = mean_{r∈R} [∃ g∈G: ‖r − g‖ ≤ r_k(g, G)]`` (real digits inside the union of the sample balls).
* ``near_copies``: ``mean_{g∈G} [min_{t∈T} ‖g − t‖₂ < τ]`` in **pixels** (L2 over the 16 × 16 [-1, 1] images),
  with ``T`` the training images (all 1,797: the teacher trains on all of them) and ``τ`` =
  ``near_copy_threshold`` (reported with the results) = the distance of the closest pair of *distinct*
  training images (exact duplicates, distance 0, are merged before taking the minimum): ``τ = 0.935`` for the
  1,797 digits at 16 × 16. A sample nearer to a training image than any two different training digits are to
  each other counts as a copy; every training image is therefore a near-copy of itself (the sanity check).
* ``num_samples``.

:func:`real_floor` gives the same numbers for real against real: a fixed random half of the 1,797 digits
(seeded) with their true labels as "samples", the other half as the reference set (FID, precision, recall)
and as the "training set" (near-copies, with ``τ`` of that half) — the floor row of a results table. Its
class accuracy is mostly on digits the classifier trained on, so it is near 1 by construction.

``DigitsEvaluator`` (registered as ``'digits'`` in ``evaluators.py``) runs all of it on the final generator, and
the generator's metrics alone every ``evals.digits.every_steps`` (the trainer's ``eval_curve.json``).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from dmd_jax import checkpoint, io, loop, streams
from dmd_jax.data import digits as digits_data
from dmd_jax.evaluation import fid, sampling

DEFAULT_STEPS = 500
DEFAULT_CHECKPOINT_EVERY = 100
K_NEAREST = 3
PARAMS_FILE = "classifier_params.npz"
INFO_FILE = "classifier.json"
CHECKPOINT_FOLDER = "checkpoints"         # Orbax (dmd_jax/checkpoint.py), removed once the classifier is written
_ORDER_SALT = 20190  # the classifier's batch stream: default_rng([seed, _ORDER_SALT, step])
_FORMAT = 1          # bumped when the classifier or its training changes


# ---------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
  """CNN for ``[N, size, size, 1]`` images in [-1, 1]: logits ``[N, num_classes]``, or ``(logits, features)``
  with ``return_features`` (the Dense-``hidden`` SiLU activations, the metrics' features)."""
  size: int = 16
  widths: Sequence[int] = (32, 64, 128)
  hidden: int = 128
  num_classes: int = digits_data.NUM_CLASSES

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    h = x
    for i, width in enumerate(self.widths):
      h = nn.silu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, name=f"conv{i}")(h))
    h = h.reshape(h.shape[0], -1)
    feats = nn.silu(nn.Dense(self.hidden, name="hidden")(h))
    logits = nn.Dense(self.num_classes, name="logits")(feats)
    return (logits, feats) if return_features else logits


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A trained classifier: the module, its parameters, and ``info`` (``classifier.json``'s contents plus
  ``loaded``: whether this call read a finished classifier instead of training)."""
  module: DigitsClassifier
  params: Any
  info: dict


def _check_images(images, size: int, what: str = "images") -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[1:] != (size, size, 1):
    raise ValueError(f"{what} must be grayscale NHWC [N, {size}, {size}, 1], got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{what} must be floating point in [-1, 1], got dtype {x.dtype}")
  if x.shape[0] == 0:
    raise ValueError(f"{what}: no images")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: {int(np.sum(~np.isfinite(x)))} pixel values are not finite")
  return x


def _settings(size, steps, seed, held_out_fraction, batch_size, learning_rate, module) -> dict:
  return {"format": _FORMAT, "size": int(size), "steps": int(steps), "seed": int(seed),
          "held_out_fraction": float(held_out_fraction), "batch_size": int(batch_size),
          "learning_rate": float(learning_rate), "widths": [int(w) for w in module.widths],
          "hidden": int(module.hidden)}


def _differences(have: dict, want: dict) -> str:
  keys = sorted(set(have) | set(want))
  return ", ".join(f"{k}={have.get(k)!r} there, {want.get(k)!r} asked" for k in keys if have.get(k) != want.get(k))


def _flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def _unflat(flat: dict[str, np.ndarray]):
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def load_params(path: str):
  """Classifier parameters from a flat-key ``.npz`` (``conv0/kernel``, ...)."""
  return _unflat(io.load_npz(path))


def batch_plan(seed: int, step: int, num_train: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Step ``step``'s training batch: ``(rows [B] of the train split, without repeats; shift offsets [B, 2]
  in {0, 1, 2}, i.e. −1, 0, +1 px)``, a pure function of its arguments."""
  if batch_size > num_train:
    raise ValueError(f"batch_size={batch_size} exceeds the {num_train} training digits")
  rng = np.random.default_rng([int(seed), _ORDER_SALT, int(step)])
  return rng.choice(num_train, batch_size, replace=False), rng.integers(0, 3, (batch_size, 2))


def _shift(x, offsets):
  """Each image moved by ``offsets - 1`` px (rows, columns), the uncovered border filled with -1."""
  size = x.shape[1]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (size, size, im.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def _optimizer(learning_rate: float, steps: int):
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=0.05))


@functools.lru_cache(maxsize=8)
def _train_step(module: DigitsClassifier, learning_rate: float, steps: int):
  opt = _optimizer(learning_rate, steps)

  def step(params, opt_state, x, offsets, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, _shift(x, offsets))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)


def train_classifier(directory: str, *, size: int = 16, steps: int = DEFAULT_STEPS, seed: int = 0,
                     held_out_fraction: float = 0.2, batch_size: int = 128, learning_rate: float = 2e-3,
                     checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, module: DigitsClassifier | None = None,
                     write: bool = True, on_step: Callable[[int], None] | None = None) -> Classifier:
  """The digits classifier of ``directory``: loaded when a finished one with these settings is there, else
  trained (resuming from the Orbax checkpoint in ``checkpoints/`` when present) and saved there.

  Args:
    directory: its folder (local or remote, through ``dmd_jax.io``).
    size: image size (``digits.load(size)``).
    steps: Adam steps of ``batch_size`` digits of the train split.
    seed: initial parameters (``PRNGKey(seed)``), batch order and shifts (:func:`batch_plan`), and the split.
    held_out_fraction: the held-out split (``digits.split``), which gives ``held_out_accuracy``.
    checkpoint_every: a resumable checkpoint every this many steps (0: none; none either with several processes).
    module: the architecture (default ``DigitsClassifier(size=size)``).
    write: write files (False on processes other than 0: they train the same classifier in memory).
    on_step: called with the number of steps done after each step (and its checkpoint); tests use it to
      interrupt a training.

  Raises a ValueError naming the differences when ``directory`` holds a classifier (or checkpoint) trained
  with other settings.
  """
  module = DigitsClassifier(size=size) if module is None else module
  if module.size != size:
    raise ValueError(f"module.size={module.size} but size={size}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  settings = _settings(size, steps, seed, held_out_fraction, batch_size, learning_rate, module)
  info_path, params_path = io.join(directory, INFO_FILE), io.join(directory, PARAMS_FILE)

  if io.exists(info_path):
    info = io.read_json(info_path)
    if info.get("settings") != settings:
      raise ValueError(f"the digits classifier in {directory} was trained with other settings "
                       f"({_differences(info.get('settings', {}), settings)}): delete the folder to retrain, or "
                       "use another one")
    logging.info("digits classifier: loaded from %s (held-out accuracy %.4f)", directory,
                 info["held_out_accuracy"])
    return Classifier(module, load_params(params_path), {**info, "loaded": True})

  images, labels = digits_data.load(size)
  train_idx, held_idx = digits_data.split(held_out_fraction, seed)
  x_train, y_train = np.asarray(images[train_idx]), np.asarray(labels[train_idx])
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 1), jnp.float32))["params"]
  state = {"params": params, "opt_state": _optimizer(learning_rate, steps).init(params)}
  # Orbax saves are collective: with several processes (only process 0 writes) the ~20 s fit is not resumable
  resumable = write and checkpoint_every > 0 and jax.process_count() == 1
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=1) if resumable else None
  start, seconds = 0, 0.0
  if ckpt is not None and ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    have = ckpt.restore_meta(start)
    if have.get("settings") != settings:
      raise ValueError(f"digits classifier checkpoint {ckpt.directory} was written with other settings "
                       f"({_differences(have.get('settings', {}), settings)}): delete it, or train into another "
                       "folder")
    state, _ = ckpt.restore(start, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    seconds = float(have["train_seconds"])
    logging.info("digits classifier: resuming from step %d (%s)", start, ckpt.directory)
  step_fn = _train_step(module, float(learning_rate), int(steps))

  def one_step(st, step):
    rows, offsets = batch_plan(seed, step, len(train_idx), batch_size)
    p, o, loss = step_fn(st["params"], st["opt_state"], x_train[rows], offsets, y_train[rows])
    return {"params": p, "opt_state": o}, {"loss": loss}

  t0 = time.perf_counter()
  done = loop.run(one_step, state, start=start, total=steps, what="digits classifier",
                  log_every=max(steps // 5, 1), log_keys=("loss",), checkpointer=ckpt,
                  checkpoint_every=checkpoint_every, on_step=on_step, preemptible=False,
                  meta=lambda step: {"settings": settings, "step": step,
                                     "train_seconds": seconds + time.perf_counter() - t0})
  params = jax.device_get(done.state["params"])
  seconds += time.perf_counter() - t0
  loss = done.last_metrics.get("loss")

  logits, _ = _forward(module, params, images[held_idx])
  accuracy = float(np.mean(np.argmax(logits, -1) == labels[held_idx]))
  info = {"settings": settings, "held_out_accuracy": accuracy, "num_held_out": int(len(held_idx)),
          "num_train": int(len(train_idx)), "steps": int(steps), "size": int(size), "seed": int(seed),
          "held_out_fraction": float(held_out_fraction), "train_seconds": round(seconds, 3),
          "final_loss": loss if steps > start else None}
  logging.info("digits classifier: %d steps in %.1f s, held-out accuracy %.4f (%d digits)", steps, seconds,
               accuracy, len(held_idx))
  if write:
    io.write_npz(params_path, **_flat(params))
    io.write_json(info_path, info)   # last: marks the classifier finished
    io.remove_tree(io.join(directory, CHECKPOINT_FOLDER))
  return Classifier(module, jax.tree.map(jnp.asarray, params), {**info, "loaded": False})


# ---------------------------------------------------------------------------------------------------------
# Features and metrics
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _compiled_apply(module: DigitsClassifier):
  return jax.jit(lambda params, x: module.apply({"params": params}, x, return_features=True))


def _forward(module: DigitsClassifier, params, images, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """``(logits, features)`` of ``images`` as float64 host arrays, in fixed-size (padded) batches."""
  x = _check_images(images, module.size).astype(np.float32)
  apply = _compiled_apply(module)
  batch_size = max(1, min(int(batch_size), len(x)))
  logits, feats = [], []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.full((batch_size - n,) + chunk.shape[1:], -1.0, np.float32)])
    lo, fe = apply(params, chunk)
    logits.append(np.asarray(lo, np.float64)[:n])
    feats.append(np.asarray(fe, np.float64)[:n])
  return np.concatenate(logits), np.concatenate(feats)


def features(module: DigitsClassifier, params, images, batch_size: int = 512) -> np.ndarray:
  """Penultimate features ``φ(images)``: float64 ``[N, module.hidden]``; images ``[N, size, size, 1]``."""
  return _forward(module, params, images, batch_size)[1]


def class_accuracy(logits: np.ndarray, labels) -> float:
  """``mean_i [argmax logits_i = labels_i]``."""
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != logits.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} samples")
  return float(np.mean(np.argmax(logits, -1) == labels))


def feature_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """FID between two feature sets (``fid.FeatureStats`` + ``fid.frechet_distance``, float64)."""
  stats = []
  for f in (feats_a, feats_b):
    s = fid.FeatureStats(f.shape[1])
    s.update(f)
    stats.append(s.mu_sigma())
  return fid.frechet_distance(*stats[0], *stats[1])


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``‖a_i − b_j‖²`` [len(a), len(b)] in float64 (clipped at 0)."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int = K_NEAREST, chunk: int = 1024) -> np.ndarray:
  """``r_k(x_i, x)``: distance from each row to its k-th nearest other row (float64 [N])."""
  x = np.asarray(x, np.float64)
  if not 1 <= k < len(x):
    raise ValueError(f"k={k} nearest neighbours need more than k points, have {len(x)}")
  out = np.empty(len(x))
  for i in range(0, len(x), chunk):
    d = _sq_dists(x[i:i + chunk], x)
    d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = -1.0   # the point itself sorts first
    out[i:i + chunk] = np.sqrt(np.maximum(np.partition(d, k, axis=1)[:, k], 0.0))
  return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """For each point, whether some ``‖point − centre_j‖ ≤ radii_j``."""
  r2 = radii ** 2
  return np.concatenate([(_sq_dists(points[i:i + chunk], centres) <= r2[None, :]).any(1)
                         for i in range(0, len(points), chunk)])


def precision_recall(real_feats: np.ndarray, gen_feats: np.ndarray, k: int = K_NEAREST) -> tuple[float, float]:
  """k-NN precision and recall (Kynkäänniemi et al. 2019; module docstring) of generated against real
  features."""
  real, gen = np.asarray(real_feats, np.float64), np.asarray(gen_feats, np.float64)
  precision = float(np.mean(_inside(gen, real, knn_radii(real, k))))
  recall = float(np.mean(_inside(real, gen, knn_radii(gen, k))))
  return precision, recall


def _pixels(images) -> np.ndarray:
  x = np.asarray(images, np.float64)
  return x.reshape(len(x), -1)


def near_copy_threshold(training) -> float:
  """``τ``: the L2 pixel distance of the closest pair of distinct training images (exact duplicates merged)."""
  t = np.unique(_pixels(training), axis=0)
  if len(t) < 2:
    raise ValueError("the near-copy threshold needs at least two distinct training images")
  best, pair = np.inf, (0, 1)
  for i in range(0, len(t), 1024):
    d = _sq_dists(t[i:i + 1024], t)
    d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = np.inf
    j = np.unravel_index(np.argmin(d), d.shape)
    if d[j] < best:
      best, pair = d[j], (i + j[0], j[1])
  return float(np.linalg.norm(t[pair[0]] - t[pair[1]]))   # the exact distance of the closest pair


def nearest_training_distance(samples, training, chunk: int = 1024) -> np.ndarray:
  """``min_t ‖sample − t‖₂`` in pixels, per sample (float64 [N])."""
  s, t = _pixels(samples), _pixels(training)
  return np.concatenate([np.sqrt(_sq_dists(s[i:i + chunk], t).min(1)) for i in range(0, len(s), chunk)])


def near_copies(samples, training, threshold: float | None = None) -> tuple[float, float]:
  """``(fraction of samples nearer than τ to a training image, τ)``; ``τ`` from :func:`near_copy_threshold`
  unless given."""
  tau = near_copy_threshold(training) if threshold is None else float(threshold)
  return float(np.mean(nearest_training_distance(samples, training) < tau)), tau


@dataclasses.dataclass
class Reference:
  """The real side of the metrics: reference images and their features, training images and ``τ``."""
  images: np.ndarray
  features: np.ndarray
  training: np.ndarray
  threshold: float


def reference(module: DigitsClassifier, params, batch_size: int = 512, images=None, training=None) -> Reference:
  """The reference set (default all 1,797 digits at ``module.size``) with its features, and the training set
  of the near-copy metric (default the same 1,797) with its ``τ``."""
  all_digits = digits_data.load(module.size)[0]
  images = all_digits if images is None else _check_images(images, module.size, "reference images")
  training = all_digits if training is None else _check_images(training, module.size, "training images")
  return Reference(np.asarray(images), features(module, params, images, batch_size), np.asarray(training),
                   near_copy_threshold(training))


def digits_metrics(samples, labels, module: DigitsClassifier, params, *, ref: Reference | None = None,
                   k: int = K_NEAREST, batch_size: int = 512) -> dict:
  """``{fid, class_accuracy, precision, recall, near_copies, near_copy_threshold, num_samples}`` of
  ``samples`` (``[N, size, size, 1]``, clipped to [-1, 1]) generated for ``labels`` ([N] ints, or None for
  unconditional samples: ``class_accuracy`` None) against ``ref`` (default :func:`reference`: all 1,797
  digits as reference and training set). Formulas in the module docstring."""
  x = np.clip(_check_images(samples, module.size, "samples"), -1.0, 1.0)
  if len(x) <= k:
    raise ValueError(f"need more than k={k} samples, got {len(x)}")
  ref = reference(module, params, batch_size) if ref is None else ref
  logits, feats = _forward(module, params, x, batch_size)
  precision, recall = precision_recall(ref.features, feats, k)
  copies, tau = near_copies(x, ref.training, ref.threshold)
  return {"fid": feature_fid(feats, ref.features),
          "class_accuracy": None if labels is None else class_accuracy(logits, labels),
          "precision": precision, "recall": recall, "near_copies": copies, "near_copy_threshold": tau,
          "num_samples": int(len(x))}


def halves(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The floor's split of the 1,797 digits: ``(half A: 898 indices, half B: 899)``, from ``default_rng(seed)``.
  The evaluator's reference set is half B, so that generated samples (898 of them) and half A meet the same
  reference at the same sample count: FID's small-sample bias is then the same in every row."""
  perm = np.random.default_rng(seed).permutation(digits_data.NUM_IMAGES)
  half = digits_data.NUM_IMAGES // 2
  return np.sort(perm[:half]), np.sort(perm[half:])


def real_floor(module: DigitsClassifier, params, *, seed: int = 0, k: int = K_NEAREST,
               batch_size: int = 512) -> dict:
  """:func:`digits_metrics` of real digits: a fixed random half (``default_rng(seed)``) with their true labels
  against the other half as reference and training set (module docstring)."""
  images, labels = digits_data.load(module.size)
  a, b = halves(seed)
  ref = reference(module, params, batch_size, images=images[b], training=images[b])
  return digits_metrics(images[a], labels[a], module, params, ref=ref, k=k, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------------

def _agree(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (so all of them take the same branch around collectives)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _json_ready(metrics: dict) -> dict:
  return {k: (None if v is None else int(v) if isinstance(v, (int, np.integer)) else float(v))
          for k, v in metrics.items()}


class DigitsEvaluator:
  """Digits metrics (module docstring) of ``num_samples`` generator samples (``config.evals.digits``), the
  real-vs-real floor, and with ``teacher`` the teacher's own samples (cached in
  ``<workdir>/digits_teacher_metrics_<n>.json``). The classifier is trained on first use into
  ``<workdir>/digits_classifier`` (``digits.classifier_steps``, ``digits.classifier_seed``)."""

  def __init__(self, run, writer, spec, name: str = "digits"):
    self.ctx, self.writer, self.spec, self.name = run, writer, spec, name

  def _size(self) -> int:
    shape = tuple(self.ctx.teacher.sample_shape)
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 1:
      raise ValueError(f"the digits evaluator needs square grayscale samples [size, size, 1], the teacher's "
                       f"are {shape}")
    return int(shape[0])

  def _classifier(self) -> tuple[DigitsClassifier, Any, Reference, dict]:
    run = self.ctx
    if "digits_classifier" not in run.cache:
      d = run.config.get("digits", None) or {}
      get = d.get if hasattr(d, "get") else (lambda k, v: v)
      if run.workdir is None:
        raise ValueError("the digits evaluator needs a workdir for its classifier")
      clf = train_classifier(io.join(run.workdir, "digits_classifier"), size=self._size(),
                             steps=int(get("classifier_steps", DEFAULT_STEPS)),
                             seed=int(get("classifier_seed", 0)), write=run.is_main)
      # reference: half B (``halves``), as for the floor; near-copies against all 1,797 (the teacher's data)
      ref = reference(clf.module, clf.params, images=digits_data.load(clf.module.size)[0][halves()[1]])
      floor = _json_ready(real_floor(clf.module, clf.params))
      run.cache["digits_classifier"] = (clf.module, clf.params, ref, floor, clf.info)
    return run.cache["digits_classifier"]

  def _metrics(self, x, cond) -> dict:
    run = self.ctx
    module, params, ref, _, _ = self._classifier()
    labels = np.asarray(cond) if getattr(run.teacher.conditions, "num_classes", None) else None
    images = np.asarray(sampling.to_outputs(run, x), np.float32)
    return _json_ready(digits_metrics(images, labels, module, params, ref=ref))

  def _teacher(self, n: int) -> dict:
    run = self.ctx
    cache = io.join(run.workdir, f"digits_teacher_metrics_{n}.json")
    if _agree(io.exists(cache)):
      cached = io.read_json(cache)
      if cached.get("num_samples") == n:
        return cached
    x, cond = sampling.teacher_samples(run, n, streams.key(run.config.seed, "teacher_reference"))
    metrics = self._metrics(x, cond)
    if run.is_main:
      io.write_json(cache, metrics)
    return metrics

  def run(self, params, step, final):
    run = self.ctx
    n = int(self.spec.num_samples)
    if n <= K_NEAREST:
      raise ValueError(f"the digits evaluator needs evals.{self.name}.num_samples > {K_NEAREST}, got {n}")
    _, _, _, floor, info = self._classifier()
    x, cond = sampling.generate(run, params, n, streams.key(run.config.seed, "fid"))
    results = dict(self._metrics(x, cond))
    scalars = {f"eval/digits/{k}": v for k, v in results.items() if v is not None}
    if not final:   # every_steps: the generator's metrics alone, the same samples' count and noise
      self.writer.write_scalars(step, scalars)
      logging.info("digits metrics at step %d (%d samples): FID %.3f, precision %.3f, recall %.3f", step, n,
                   results["fid"], results["precision"], results["recall"])
      return {"digits": results}
    if self.spec.get("teacher", False):
      results["teacher"] = self._teacher(n)
      scalars.update({f"eval/digits/teacher/{k}": v for k, v in results["teacher"].items() if v is not None})
    results["real_floor"] = floor
    results["classifier_held_out_accuracy"] = float(info["held_out_accuracy"])
    self.writer.write_scalars(step, scalars)
    acc = results["class_accuracy"]
    logging.info("digits metrics at step %d (%d samples): FID %.3f (real floor %.3f), class accuracy %s, "
                 "precision %.3f, recall %.3f, near-copies %.4f (tau %.3f)", step, n, results["fid"],
                 floor["fid"], "n/a" if acc is None else f"{acc:.4f}", results["precision"], results["recall"],
                 results["near_copies"], results["near_copy_threshold"])
    return {"digits": results}
