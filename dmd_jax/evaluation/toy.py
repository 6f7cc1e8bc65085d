"""Metrics of the toy problem against the known mixture.

* ``tv``: total variation between the nearest-mode histogram of the samples and the true weights;
* ``precision``: fraction of samples within 4 std of their nearest mean;
* ``mode_share``: per mode, (fraction of samples nearest to it) / (its true weight);
* ``mmd2_ratio``: biased MMD² (RBF kernel, bandwidth 0.1) between 5,000 samples and 5,000 true samples,
  divided by its floor — the same estimate between two independent sets of 5,000 true samples.
  The floor depends on the sample count, so the counts are fixed. Both the estimate and the floor are averaged
  over 4 draws (disjoint sets of 5,000 of the 20,000 samples; independent true sets): one draw varies by ±30%.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dmd_jax import io
from dmd_jax.data.toy import GaussianMixture

MMD_SAMPLES = 5000
MMD_BANDWIDTH = 0.1


def _nearest(x, means):
  d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
  k = d2.argmin(1)
  return k, np.sqrt(d2[np.arange(len(x)), k])


def _rbf_mean(a, b, bw, chunk=1000):
  total = 0.0
  bb = (b ** 2).sum(1)
  for i in range(0, len(a), chunk):
    ac = a[i:i + chunk]
    d2 = (ac ** 2).sum(1)[:, None] + bb[None] - 2 * ac @ b.T
    total += np.exp(-np.maximum(d2, 0) / (2 * bw ** 2)).sum()
  return total / (len(a) * len(b))


def mmd2(x, y, bandwidth=MMD_BANDWIDTH) -> float:
  """Biased MMD² estimate with an RBF kernel ``exp(-|a-b|^2 / 2 bw^2)``, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(_rbf_mean(x, x, bandwidth) + _rbf_mean(y, y, bandwidth) - 2 * _rbf_mean(x, y, bandwidth))


def mmd2_floor(mixture: GaussianMixture, seed: int = 0, repeats: int = 4) -> float:
  """The MMD² between two independent sets of 5,000 true samples, averaged over ``repeats`` pairs of
  sets (a single pair's estimate varies by about ±30%)."""
  rng = np.random.default_rng([seed, 12345])
  return float(np.mean([mmd2(mixture.sample(rng, MMD_SAMPLES), mixture.sample(rng, MMD_SAMPLES))
                        for _ in range(repeats)]))


def toy_metrics(samples: np.ndarray, mixture: GaussianMixture, seed: int = 0,
                floor: float | None = None) -> dict:
  """All toy metrics of ``samples`` [N, D] (use N = 20,000) against ``mixture``."""
  samples = np.asarray(samples, np.float64)
  if not np.all(np.isfinite(samples)):
    raise ValueError(f"{np.sum(~np.isfinite(samples))} sample coordinates are not finite")
  k, dist = _nearest(samples, mixture.means)
  hist = np.bincount(k, minlength=len(mixture.weights)) / len(samples)
  share = hist / mixture.weights
  floor = mmd2_floor(mixture, seed) if floor is None else floor
  # the same estimate on each disjoint set of 5,000 samples (up to 4), each against its own true set, averaged
  sets = max(1, min(4, len(samples) // MMD_SAMPLES))
  m = float(np.mean([mmd2(samples[k * MMD_SAMPLES:(k + 1) * MMD_SAMPLES],
                          mixture.sample(np.random.default_rng([seed, 54321, k]), MMD_SAMPLES))
                     for k in range(sets)]))
  return {
      "tv": float(0.5 * np.abs(hist - mixture.weights).sum()),
      "precision": float(np.mean(dist <= 4 * mixture.std)),
      "min_mode_share": float(share.min()),
      "mode_share": [round(float(s), 4) for s in share],
      "mmd2": m,
      "mmd2_floor": floor,
      "mmd2_ratio": m / floor,
  }


def scatter_png(path: str, panels: list[tuple[str, np.ndarray]], mixture: GaussianMixture,
                size: int = 420, max_points: int = 5000) -> None:
  """Side-by-side scatter plots (one panel per ``(title, samples)``) with the true means marked."""

  lo = mixture.means.min(0) - 0.35 * max(np.ptp(mixture.means[:, 0]), 1.0)
  hi = mixture.means.max(0) + 0.35 * max(np.ptp(mixture.means[:, 0]), 1.0)
  title_h = 22
  img = Image.new("RGB", (size * len(panels), size + title_h), "white")
  draw = ImageDraw.Draw(img)

  def to_px(p, x0):
    u = (p - lo) / (hi - lo)
    return x0 + u[..., 0] * (size - 1), title_h + (1 - u[..., 1]) * (size - 1)

  for i, (title, pts) in enumerate(panels):
    x0 = i * size
    draw.rectangle([x0, title_h, x0 + size - 1, title_h + size - 1], outline=(180, 180, 180))
    draw.text((x0 + 6, 4), title, fill=(0, 0, 0))
    px, py = to_px(np.asarray(pts[:max_points], np.float64), x0)
    for a, b in zip(px, py):
      if x0 <= a < x0 + size and title_h <= b < title_h + size:
        draw.point((a, b), fill=(200, 40, 40))
    mx, my = to_px(mixture.means, x0)
    for a, b in zip(mx, my):
      draw.ellipse([a - 3, b - 3, a + 3, b + 3], outline=(30, 30, 200))
  with io.atomic_write(path) as f:   # local or gs://; never a half-written PNG
    img.save(f, format="PNG")
