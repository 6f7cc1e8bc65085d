"""Noise parameterisations behind the DMD losses (docs/method.md §3–4).

A schedule answers four questions for integer timesteps ``t`` in ``[0, num_timesteps)``:
how to noise a clean sample (``add_noise``), which ``t`` the distribution-matching loss and the fake-score
loss draw from (``sample_dm_t`` / ``sample_fake_t``), and the fake-score loss weight on the squared
x0 error (``fake_loss_weight``). Denoisers are x0-predictors; ``eps_to_x0`` / ``x0_to_eps`` convert.

* ``EDMSchedule`` (VE, Karras et al. 2022): a table of 1000 Karras sigmas, ascending
  (index 0 = sigma_min = 0.002, index 999 = sigma_max = 80), ``x_t = x + sigma_t eps``.
* ``VPSchedule`` (DDPM / Stable Diffusion): scaled-linear betas 0.00085 → 0.012 over 1000 steps,
  ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def bcast(v, x):
  """Reshapes a per-sample vector ``v`` [N] to broadcast against ``x`` [N, ...]."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
  """``n`` Karras sigmas in float64, ascending from sigma_min to sigma_max."""
  ramp = np.linspace(0.0, 1.0, n, dtype=np.float64)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + ramp * (hi - lo)) ** rho


class _TimestepDraws:
  """The timestep draws shared by every schedule (docs/method.md §3–4): the DM loss takes t uniformly from the
  integers [dm_t_min, dm_t_max] (2%..98% of T), the fake-score loss from all of [0, num_timesteps)."""

  def sample_dm_t(self, rng, n):
    return jax.random.randint(rng, (n,), self.dm_t_min, self.dm_t_max + 1)

  def sample_fake_t(self, rng, n):
    return jax.random.randint(rng, (n,), 0, self.num_timesteps)


@dataclasses.dataclass(frozen=True)
class EDMSchedule(_TimestepDraws):
  """VE noise on the Karras grid; t is an index into ``sigmas`` (ascending)."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  sigma_data: float = 0.5
  num_timesteps: int = 1000
  dm_t_min: int = 20    # DM loss draws t uniformly from [dm_t_min, dm_t_max] (2%..98% of T)
  dm_t_max: int = 980

  @property
  def sigmas(self) -> np.ndarray:
    return karras_sigmas(self.num_timesteps, self.sigma_min, self.sigma_max, self.rho)

  def sigma(self, t):
    return jnp.asarray(self.sigmas, jnp.float32)[t]

  def add_noise(self, x, eps, t):
    return x + bcast(self.sigma(t), x) * eps

  def fake_loss_weight(self, t):
    """EDM's lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 on the squared x0 error (docs/method.md §4)."""
    s = self.sigma(t)
    return 1.0 / s ** 2 + 1.0 / self.sigma_data ** 2


def edm_precond_coefficients(sigma, sigma_data: float):
  """EDM's preconditioning (Karras et al. 2022, Table 1) for ``D(x; s) = c_skip x + c_out F(c_in x, c_noise)``.

  ``sigma``: per-sample noise levels [N] (float32). Returns ``(c_skip, c_out, c_in, c_noise)``: the first
  three shaped [N] (broadcast them against ``x`` with ``bcast``), ``c_noise = ln(sigma) / 4`` [N].
  The one definition used by the EDM networks (``models/edm.py``) and the toy fake score
  (``families/toy/teacher.edm_precond``).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sd2 = sigma_data ** 2
  c_skip = sd2 / (sigma ** 2 + sd2)
  c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sd2)
  c_in = 1.0 / jnp.sqrt(sigma ** 2 + sd2)
  return c_skip, c_out, c_in, jnp.log(sigma) / 4.0


def scaled_linear_alphas_cumprod(num_timesteps=1000, beta_start=0.00085, beta_end=0.012) -> np.ndarray:
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class VPSchedule(_TimestepDraws):
  """DDPM / Stable Diffusion noise; t is the DDPM timestep."""
  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_timesteps: int = 1000
  dm_t_min: int = 20
  dm_t_max: int = 980

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return scaled_linear_alphas_cumprod(self.num_timesteps, self.beta_start, self.beta_end)

  def _abar(self, t):
    return jnp.asarray(self.alphas_cumprod, jnp.float32)[t]

  def add_noise(self, x, eps, t):
    a = bcast(self._abar(t), x)
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * eps

  def eps_to_x0(self, x_t, eps, t):
    """``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, in float32 (abar_999 ≈ 0.0047)."""
    a = bcast(self._abar(t), x_t)
    x_t, eps = x_t.astype(jnp.float32), eps.astype(jnp.float32)
    return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)

  def x0_to_eps(self, x_t, x0, t):
    a = bcast(self._abar(t), x_t)
    return (x_t.astype(jnp.float32) - jnp.sqrt(a) * x0.astype(jnp.float32)) / jnp.sqrt(1.0 - a)

  def fake_loss_weight(self, t):
    """Epsilon-MSE written on x0: ||eps_hat - eps||^2 = SNR(t) ||x0_hat - x0||^2."""
    a = self._abar(t)
    return a / (1.0 - a)


def from_config(cfg) -> EDMSchedule | VPSchedule:
  """Builds the schedule named by ``cfg.kind`` ('edm' or 'vp') from the config's fields."""
  fields = {k: v for k, v in cfg.items() if k != "kind"}
  if cfg.kind == "edm":
    return EDMSchedule(**fields)
  if cfg.kind == "vp":
    return VPSchedule(**fields)
  raise ValueError(f"schedule.kind must be 'edm' or 'vp', got {cfg.kind!r}")
