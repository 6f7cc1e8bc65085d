"""Adapters that turn each model family into one x0-denoiser interface.

Every denoiser the method drives is ``denoise(params, x_t, t, cond) -> x0_hat`` with ``t`` an integer
timestep of the schedule. This file holds the pieces shared by families: EDM preconditioning around a
raw network, and the exact denoiser of a Gaussian mixture (the analytic teacher of the toy problem).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.schedules import _bcast


def edm_precond(raw_apply: Callable, sigma_data: float) -> Callable:
  """EDM preconditioning (Karras et al. 2022, Table 1): ``D(x; s) = c_skip x + c_out F(c_in x, c_noise)``.

  ``raw_apply(params, x_in, c_noise, cond)``; returns ``D(params, x, sigma, cond)`` with sigma [N].
  """
  sd2 = sigma_data ** 2

  def denoise(params, x, sigma, cond=None):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    s = _bcast(sigma, x)
    c_skip = sd2 / (s ** 2 + sd2)
    c_out = s * sigma_data / jnp.sqrt(s ** 2 + sd2)
    c_in = 1.0 / jnp.sqrt(s ** 2 + sd2)
    f = raw_apply(params, (c_in * x).astype(x.dtype), jnp.log(sigma) / 4.0, cond)
    return c_skip * x + c_out * f.astype(jnp.float32)

  return denoise


def gaussian_mixture_denoiser(weights, means, std) -> Callable:
  """Exact ``E[x0 | x0 + sigma eps = x]`` for x0 ~ sum_k w_k N(m_k, std^2 I).

  Returns ``D(x, sigma)`` (sigma [N] or scalar). With variance v = std^2 + sigma^2, the posterior over
  components is r_k ∝ w_k exp(-|x - m_k|^2 / 2v) and ``E[x0 | x, k] = m_k + (std^2 / v)(x - m_k)``.
  """
  w = jnp.asarray(np.asarray(weights, np.float64) / np.sum(weights), jnp.float32)
  m = jnp.asarray(means, jnp.float32)
  s2 = float(std) ** 2

  def denoise(x, sigma):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    v = s2 + sigma ** 2                                              # [N]
    d2 = jnp.sum((x[:, None, :] - m[None]) ** 2, axis=-1)            # [N, K]
    r = jax.nn.softmax(jnp.log(w)[None] - d2 / (2.0 * v[:, None]), axis=-1)
    post_mean = m[None] + (s2 / v)[:, None, None] * (x[:, None, :] - m[None])
    return jnp.sum(r[..., None] * post_mean, axis=1)

  return denoise
