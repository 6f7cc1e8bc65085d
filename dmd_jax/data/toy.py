"""The toy distributions: mixtures of isotropic 2-D Gaussians (the embedded default's teacher data)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  weights: np.ndarray   # [K], sums to 1
  means: np.ndarray     # [K, D]
  std: float

  @classmethod
  def from_config(cls, cfg) -> "GaussianMixture":
    w = np.asarray(cfg.weights, np.float64)
    m = np.asarray(cfg.means, np.float64)
    if w.ndim != 1 or m.ndim != 2 or len(w) != len(m):
      raise ValueError(f"toy.weights must be [K] and toy.means [K, D]; got {w.shape} and {m.shape}")
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"toy.weights must be non-negative with a positive sum, got {list(w)}")
    if not cfg.std > 0:
      raise ValueError(f"toy.std must be positive, got {cfg.std}")
    return cls(w / w.sum(), m, float(cfg.std))

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    k = rng.choice(len(self.weights), size=n, p=self.weights)
    return self.means[k] + self.std * rng.standard_normal((n, self.means.shape[1]))


def circle_means(num_modes: int, radius: float = 1.0) -> tuple[tuple[float, float], ...]:
  a = 2 * np.pi * np.arange(num_modes) / num_modes
  return tuple((float(radius * np.cos(t)), float(radius * np.sin(t))) for t in a)


def grid_means(side: int, spacing: float) -> tuple[tuple[float, float], ...]:
  c = (np.arange(side) - (side - 1) / 2) * spacing
  return tuple((float(x), float(y)) for x in c for y in c)
