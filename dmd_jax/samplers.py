"""Teacher ODE samplers. Used for the regression pairs (method.md §5) and for teacher baselines."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def heun_sigmas(num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> np.ndarray:
  """EDM Algorithm 2 time steps in float64: ``t_i`` for i < N, then ``t_N = 0`` (N + 1 values)."""
  if num_steps < 2:
    raise ValueError(f"the Heun sampler needs num_steps >= 2, got {num_steps}")
  i = np.arange(num_steps, dtype=np.float64)
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
  return np.concatenate([t, [0.0]])


def edm_heun_sample(denoise: Callable, z, num_steps: int = 18, sigma_min=0.002, sigma_max=80.0,
                    rho=7.0):
  """Deterministic EDM Heun sampler (S_churn = 0), ``2 N - 1`` evaluations of ``denoise(x, sigma)``.

  ``denoise(x, sigma)`` is the x0-predictor D(x; sigma) with ``sigma`` a float32 scalar. Starts from
  ``x_0 = t_0 z``; each step takes an Euler step to ``t_{i+1}`` and, except on the last step (to 0), the
  second-order correction.
  """
  t = heun_sigmas(num_steps, sigma_min, sigma_max, rho)
  t_cur = jnp.asarray(t[:-2], jnp.float32)   # the N - 1 steps that end at t > 0 get the correction
  t_nxt = jnp.asarray(t[1:-1], jnp.float32)
  x = z.astype(jnp.float32) * jnp.float32(t[0])

  def heun_step(x, ts):
    tc, tn = ts
    d = (x - denoise(x, tc)) / tc
    x_euler = x + (tn - tc) * d
    d2 = (x_euler - denoise(x_euler, tn)) / tn
    return x + (tn - tc) * 0.5 * (d + d2), None

  x, _ = jax.lax.scan(heun_step, x, (t_cur, t_nxt))
  tc = jnp.float32(t[-2])
  return denoise(x, tc)   # Euler to t_N = 0: x + (0 - t) (x - D) / t = D(x; t)
