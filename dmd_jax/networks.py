"""What the method drives, built from a config: ``DMDNetworks`` bundles the schedule, the one-step
generator, the real (teacher) and fake x0-denoisers, the noise / condition samplers and the teacher's
ODE sampler. ``dmd.py`` only ever sees this interface. One builder per model family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dmd_jax import schedules
from dmd_jax.data.toy import GaussianMixture
from dmd_jax.denoisers import edm_precond, gaussian_mixture_denoiser
from dmd_jax.models import mlp
from dmd_jax.samplers import edm_heun_sample


@dataclasses.dataclass(frozen=True)
class DMDNetworks:
  schedule: Any
  generate: Callable        # (generator_params, z, cond) -> x
  real_denoise: Callable    # (teacher_params, x_t, t, cond) -> x0_hat   (guidance inside)
  fake_denoise: Callable    # (fake_params, x_t, t, cond) -> x0_hat
  sample_noise: Callable    # (rng, n) -> z
  sample_cond: Callable     # (rng, n) -> cond or None
  teacher_sample: Callable  # (teacher_params, z, cond) -> x  (the teacher's ODE sampler)
  init: Callable            # rng -> (generator_params, fake_params)
  sample_shape: tuple       # shape of one generated sample


def build(config) -> tuple[DMDNetworks, dict]:
  """Returns ``(nets, frozen)``; ``frozen['teacher']`` holds the teacher's parameters."""
  family = config.model.family
  if family == "toy":
    return _build_toy(config)
  raise ValueError(f"model.family {family!r} is not known; expected one of: 'toy'")


def _build_toy(config):
  schedule = schedules.from_config(config.schedule)
  mixture = GaussianMixture.from_config(config.toy)
  dim = mixture.means.shape[1]
  mog = gaussian_mixture_denoiser(mixture.weights, mixture.means, mixture.std)

  generator = mlp.ToyGenerator(hidden=tuple(config.generator.hidden), dim=dim)
  fake_net = mlp.ToyDenoiserNet(hidden=tuple(config.fake_score.hidden), dim=dim,
                                num_fourier=config.fake_score.num_fourier,
                                fourier_scale=config.fake_score.fourier_scale)
  fake_D = edm_precond(lambda p, x, c_noise, cond: fake_net.apply({"params": p}, x, c_noise),
                       schedule.sigma_data)

  def init(rng):
    r_g, r_f = jax.random.split(rng)
    x = jnp.zeros((1, dim), jnp.float32)
    return (generator.init(r_g, x)["params"],
            fake_net.init(r_f, x, jnp.zeros((1,), jnp.float32))["params"])

  steps = config.regression.sampler_steps
  nets = DMDNetworks(
      schedule=schedule,
      generate=lambda p, z, cond: generator.apply({"params": p}, z),
      real_denoise=lambda p, x_t, t, cond: mog(x_t, schedule.sigma(t)),
      fake_denoise=lambda p, x_t, t, cond: fake_D(p, x_t, schedule.sigma(t), cond),
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, dim), jnp.float32),
      sample_cond=lambda rng, n: None,
      teacher_sample=lambda p, z, cond: edm_heun_sample(
          mog, z, steps, schedule.sigma_min, schedule.sigma_max, schedule.rho),
      init=init,
      sample_shape=(dim,),
  )
  return nets, {"teacher": {}}
