"""The toy teacher (``configs/toy2d.py``): the exact denoiser of a 2-D Gaussian mixture; generator and fake
score are MLPs from random weights (docs/method.md §2)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import schedules
from dmd_jax.data.toy import GaussianMixture
from dmd_jax.families import base
from dmd_jax.models import gan_head, mlp
from dmd_jax.samplers import edm_heun_sample
from dmd_jax.schedules import bcast, edm_precond_coefficients


def edm_precond(raw_apply: Callable, sigma_data: float) -> Callable:
  """EDM's preconditioning around a raw network: ``D(params, x, sigma, cond) = c_skip x + c_out
  F(c_in x, c_noise, cond)`` with ``raw_apply(params, x_in, c_noise, cond)`` and sigma [N] (the coefficients:
  ``schedules.edm_precond_coefficients``, shared with ``models/edm.py``)."""
  def denoise(params, x, sigma, cond=None):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, sigma_data)
    f = raw_apply(params, (bcast(c_in, x) * x).astype(x.dtype), c_noise, cond)
    return bcast(c_skip, x) * x + bcast(c_out, x) * f.astype(jnp.float32)
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


def _generator(config, schedule, dim: int, teacher_denoise: Callable):
  """``(generate, generate_at, init)`` of the toy generator. One step (``generator.steps`` empty): an MLP
  ``G(z)`` from random weights. Several steps (DMD2, ``:dmd2,steps4``): the first step is that MLP of z
  (parameters ``first``); each later step starts, like DMD2's image generators, as the teacher — its exact
  mixture denoiser plus a trained residual whose output layer starts at zero (parameters ``refine``):
  ``x0 = D_teacher(x_t, sigma) + c_out(sigma) F(c_in x_t, ln(sigma) / 4)``, ``F`` the fake score's MLP
  architecture. The teacher's x0 at sigma_max would start every z within 0.03 of the origin, a start the DM
  gradient collapses onto one mode, hence the MLP of z first (docs/method.md §7)."""
  hidden = tuple(config.generator.hidden)
  x1 = jnp.zeros((1, dim), jnp.float32)
  if len(config.generator.steps) <= 1:
    net = mlp.ToyGenerator(hidden=hidden, dim=dim)

    def not_multistep(p, x_t, t, cond):
      raise ValueError("the one-step toy generator (an MLP of z) has no timestep input: set generator.steps "
                       "to several timesteps for a multi-step generator")
    return (lambda p, z, cond: net.apply({"params": p}, z), not_multistep,
            lambda rng: net.init(rng, x1)["params"])
  first = mlp.ToyGenerator(hidden=hidden, dim=dim)
  refine = mlp.ToyDenoiserNet(hidden=hidden, dim=dim, num_fourier=config.fake_score.num_fourier,
                              fourier_scale=config.fake_score.fourier_scale, zero_out=True)

  def at_sigma(p, x_t, sigma):
    _, c_out, c_in, c_noise = edm_precond_coefficients(sigma, schedule.sigma_data)
    return teacher_denoise(x_t, sigma) + bcast(c_out, x_t) * refine.apply({"params": p["refine"]},
                                                                           bcast(c_in, x_t) * x_t, c_noise)

  def init(rng):
    r1, r2 = jax.random.split(rng)
    return {"first": first.init(r1, x1)["params"],
            "refine": refine.init(r2, x1, jnp.zeros((1,), jnp.float32))["params"]}

  return (lambda p, z, cond: first.apply({"params": p["first"]}, z),
          lambda p, x_t, t, cond: at_sigma(p, x_t, schedule.sigma(t)),
          init)


def build(config, workdir: str | None) -> tuple[base.Teacher, dict]:
  del workdir   # nothing to read or write
  schedule = schedules.from_config(config.schedule)
  mixture = GaussianMixture.from_config(config.toy)
  dim = mixture.means.shape[1]
  mog = gaussian_mixture_denoiser(mixture.weights, mixture.means, mixture.std)

  fake_net = mlp.ToyDenoiserNet(hidden=tuple(config.fake_score.hidden), dim=dim,
                                num_fourier=config.fake_score.num_fourier,
                                fourier_scale=config.fake_score.fourier_scale)
  fake_D = edm_precond(lambda p, x, c_noise, cond: fake_net.apply({"params": p}, x, c_noise),
                       schedule.sigma_data)
  generate, generate_at, init_generator = _generator(config, schedule, dim, mog)

  def init(rng, frozen):   # random MLPs: no teacher network to copy
    del frozen
    r_g, r_f = jax.random.split(rng)
    x = jnp.zeros((1, dim), jnp.float32)
    return init_generator(r_g), fake_net.init(r_f, x, jnp.zeros((1,), jnp.float32))["params"]

  def features(p, x_t, t, cond):   # the fake MLP's last hidden layer (DMD2's GAN head input)
    sigma = schedule.sigma(t)
    _, _, c_in, c_noise = edm_precond_coefficients(sigma, schedule.sigma_data)
    return fake_net.apply({"params": p}, bcast(c_in, x_t) * x_t, c_noise, return_features=True)[1]

  head = gan_head.MLPGANHead(hidden=int(config.fake_score.hidden[-1]))
  critic = base.Critic(
      features=features,
      init=lambda rng: head.init(rng, jnp.zeros((1, int(config.fake_score.hidden[-1])), jnp.float32))["params"],
      logits=lambda p, f: head.apply({"params": p}, f))

  steps = config.regression.sampler_steps
  distance = base.distance(config)
  teacher = base.Teacher(
      name="toy",
      schedule=schedule,
      generate=generate,
      generate_at=generate_at,
      real_denoise=lambda p, x_t, t, cond: mog(x_t, schedule.sigma(t)),
      fake_denoise=lambda p, x_t, t, cond: fake_D(p, x_t, schedule.sigma(t), cond),
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, dim), jnp.float32),
      init=init,
      conditions=base.Unconditional(),
      sampler=base.TeacherSampler(
          sample=lambda p, z, cond: edm_heun_sample(mog, z, steps, schedule.sigma_min, schedule.sigma_max,
                                                    schedule.rho),
          nfe=2 * steps - 1, spec={"sampler": "edm_heun", "sampler_steps": steps}),
      regression_distance=lambda frozen, x, y: distance(None, x, y),
      decode=lambda frozen, x: x,
      encode=lambda frozen, x: x,
      critic=critic,
      images=False,
      sample_shape=(dim,),
      lora=None,            # the generator is its own MLP, not a copy of a teacher network
  )
  return teacher, {"teacher": {}}


def abstract(config) -> tuple[base.Teacher, dict]:
  """The toy teacher (analytic: nothing to read) with its frozen parameters as shapes (``families.abstract``)."""
  teacher, frozen = build(config, None)
  return teacher, base.abstract(frozen)
