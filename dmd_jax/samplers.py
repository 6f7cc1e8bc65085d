"""Teacher ODE samplers. Used for the regression pairs (docs/method.md §5) and for teacher baselines: EDM Heun
for EDM teachers; DDIM and PNDM (PLMS) with classifier-free guidance for VP / Stable Diffusion teachers."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.guidance import classifier_free_guidance, unguided
from dmd_jax.schedules import scaled_linear_alphas_cumprod


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


# ---------------------------------------------------------------------------------------------------------
# VP (DDPM / Stable Diffusion) teachers: DDIM and PNDM (PLMS) with classifier-free guidance
# ---------------------------------------------------------------------------------------------------------
#
# Both reproduce the diffusers schedulers configured as Stable Diffusion 1.5's scheduler folder
# (``steps_offset=1``, ``set_alpha_to_one=False``, "leading" timestep spacing, epsilon prediction, no clipping):
# the same timesteps, the same previous-timestep arithmetic, the same multistep coefficients. The step
# arithmetic runs in float32 (the eps -> x0 conversion included) whatever dtype ``eps_fn`` returns.

def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
  """diffusers' "leading" spacing, descending: ``arange(N) * (T // N) + steps_offset`` reversed (int64)."""
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
  ratio = num_train_timesteps // num_steps
  return (np.arange(num_steps, dtype=np.int64) * ratio + steps_offset)[::-1].copy()


def _alpha_table(alphas_cumprod, set_alpha_to_one: bool):
  """``abar`` as a float32 table with one extra entry at index -1 (= T) for "previous timestep < 0"."""
  a = np.asarray(scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod, np.float64)
  final = 1.0 if set_alpha_to_one else a[0]
  return jnp.asarray(np.concatenate([a, [final]]), jnp.float32), a.shape[0]


def _prev_index(t, num_train_timesteps: int):
  """Index into the ``_alpha_table`` table: the timestep itself, or T (the final abar) when negative."""
  return np.where(t >= 0, t, num_train_timesteps).astype(np.int32)


def guided_eps(eps_fn: Callable, x, t, cond, uncond=None, guidance_scale=1.0):
  """The guided eps (``guidance.classifier_free_guidance``, float32) at one timestep ``t`` (an int scalar,
  broadcast to the batch) of a sampler step; ``uncond=None`` calls ``eps_fn`` on the conditional batch only."""
  return classifier_free_guidance(eps_fn, x, jnp.full((x.shape[0],), t, jnp.int32), cond, uncond,
                                  guidance_scale)


def ddim_sample(eps_fn: Callable, z, cond, uncond=None, *, num_steps: int = 50, guidance_scale=1.0,
                alphas_cumprod=None, steps_offset: int = 1, set_alpha_to_one: bool = False):
  """Deterministic DDIM (eta = 0) from ``x_T = z`` as ``diffusers.DDIMScheduler`` with SD1.5's config.

  Args:
    eps_fn: ``eps_fn(x, t, cond) -> eps`` (``t`` int32 ``[batch]``); called once per step, on ``2N`` rows
      (unconditional first) when guided.
    z: unit Gaussian latents ``[N, ...]`` (SD: NHWC ``[N, 64, 64, 4]``; the scheduler's
      ``init_noise_sigma`` is 1).
    cond, uncond: conditional embeddings ``[N, ...]`` and the unconditional one (broadcast to ``cond``);
      ``uncond=None`` (or ``guidance_scale == 1``) samples without guidance.
    num_steps: ``N`` steps, ``N`` evaluations, at "leading" timesteps ``981, 961, ..., 1`` for N = 50.
    guidance_scale: ``g`` in ``eps_u + g (eps_c - eps_u)``.
    alphas_cumprod: the training ``abar`` table (default: ``schedules.scaled_linear_alphas_cumprod()``).
  Returns the final latents ``x_0`` (float32).
  """
  table, T = _alpha_table(alphas_cumprod, set_alpha_to_one)
  ts = leading_timesteps(num_steps, T, steps_offset)
  prev = _prev_index(ts - T // num_steps, T)
  if unguided(uncond, guidance_scale):
    uncond = None

  def step(x, inp):
    t, tp = inp
    eps = guided_eps(eps_fn, x, t, cond, uncond, guidance_scale)
    a, ap = table[t], table[tp]
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    return jnp.sqrt(ap) * x0 + jnp.sqrt(1.0 - ap) * eps, None

  x, _ = jax.lax.scan(step, jnp.asarray(z, jnp.float32),
                      (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32)))
  return x


def _pndm_transfer(x, eps, a, ap):
  """PNDM's ``_get_prev_sample`` (formula 9 of Liu et al. 2022) from abar ``a`` to ``ap``, float32."""
  sample_coeff = jnp.sqrt(ap / a)
  denom = a * jnp.sqrt(1.0 - ap) + jnp.sqrt(a * (1.0 - a) * ap)
  return sample_coeff * x - (ap - a) * eps / denom


# PLMS coefficients on (eps_new, eps_{-1}, eps_{-2}, eps_{-3}) for the 2nd, 3rd and 4th-and-later updates.
_PLMS = np.array([[3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]],
                 np.float64)


def pndm_sample(eps_fn: Callable, z, cond, uncond=None, *, num_steps: int = 50, guidance_scale=1.0,
                alphas_cumprod=None, steps_offset: int = 1, set_alpha_to_one: bool = False):
  """PNDM as ``diffusers.PNDMScheduler(skip_prk_steps=True)`` (SD's default scheduler): pseudo linear
  multistep (PLMS) with a second-order (Heun-like) first step, ``N + 1`` evaluations for ``N`` steps.

  Timesteps for N = 50: ``981, 961, 961, 941, ..., 1`` (the second visit of 961 is the correction of the
  first step). With ``delta = T // N`` and ``e_i`` the guided eps of evaluation i:

  * eval 0 at ``t_0``: ``x_1 = P(x_0, t_0 -> t_0 - delta, e_0)``;
  * eval 1 at ``t_0 - delta`` on ``x_1``: ``x_1 = P(x_0, t_0 -> t_0 - delta, (e_0 + e_1) / 2)``;
  * then for each later timestep t: ``x <- P(x, t -> t - delta, sum_k c_k e_{-k})`` with the
    Adams-Bashforth coefficients of order 2, 3 then 4 over the history ``e_0, e_2, e_3, ...`` (``e_1`` is
    not kept, as in diffusers),

  where ``P`` is PNDM's transfer ``sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a'))`` and a
  previous timestep below 0 uses ``abar_0`` (``set_alpha_to_one=False``). Arguments as :func:`ddim_sample`.
  Returns the final latents (float32).
  """
  table, T = _alpha_table(alphas_cumprod, set_alpha_to_one)
  ts = leading_timesteps(num_steps, T, steps_offset)   # descending t_0 > t_1 > ... > t_{N-1}
  delta = T // num_steps
  if unguided(uncond, guidance_scale):
    uncond = None
  eps_at = lambda x, t: guided_eps(eps_fn, x, t, cond, uncond, guidance_scale)

  x0 = jnp.asarray(z, jnp.float32)
  t0, t0p = int(ts[0]), int(_prev_index(np.int64(ts[0] - delta), T))
  e0 = eps_at(x0, t0)
  x1 = _pndm_transfer(x0, e0, table[t0], table[t0p])
  if num_steps == 1:
    return x1
  e1 = eps_at(x1, int(ts[1]))
  x = _pndm_transfer(x0, 0.5 * (e0 + e1), table[t0], table[t0p])

  rest = ts[1:]                                       # t_1 ... t_{N-1}: one PLMS update each
  rest_prev = _prev_index(rest - delta, T)
  order = np.minimum(np.arange(len(rest)), 2)         # 2nd order, 3rd order, then 4th order
  coeffs = jnp.asarray(_PLMS[order], jnp.float32)

  def step(carry, inp):
    x, h1, h2, h3 = carry                             # eps history, newest first
    t, tp, c = inp
    e = eps_at(x, t)
    e_plms = c[0] * e + c[1] * h1 + c[2] * h2 + c[3] * h3
    x = _pndm_transfer(x, e_plms, table[t], table[tp])
    return (x, e, h1, h2), None

  zeros = jnp.zeros_like(e0)
  (x, *_), _ = jax.lax.scan(step, (x, e0, zeros, zeros),
                            (jnp.asarray(rest, jnp.int32), jnp.asarray(rest_prev, jnp.int32), coeffs))
  return x
