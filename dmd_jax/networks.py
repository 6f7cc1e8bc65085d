"""What the method drives, built from a config: ``DMDNetworks`` bundles the schedule, the one-step
generator, the real (teacher) and fake x0-denoisers, the noise / condition samplers and the teacher's
ODE sampler. ``dmd.py`` only ever sees this interface. One builder per model family.
"""
from __future__ import annotations

import dataclasses
import json
import os
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
  num_classes: int = 0      # > 0: conditions are integer class labels in [0, num_classes)


def build(config, workdir: str | None = None) -> tuple[DMDNetworks, dict]:
  """Returns ``(nets, frozen)``; ``frozen['teacher']`` holds the teacher's parameters.

  ``workdir`` is where a ``:tiny`` config writes its random-weight teacher.
  """
  family = config.model.family
  if family == "toy":
    return _build_toy(config)
  if family == "edm":
    return _build_edm(config, workdir)
  raise ValueError(f"model.family {family!r} is not known; expected one of: 'toy', 'edm'")


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


# ---------------------------------------------------------------------------------------------------------
# EDM teachers (CIFAR-10, ImageNet-64): method.md §2. Real score, fake score and generator all start from the
# teacher; G(z, c) = D(sigma_gen z; sigma_gen, c) with sigma_gen = 80. Conditions are integer class labels,
# one-hot inside; generated samples draw them uniformly.
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _teacher_dir(config, workdir):
  """The converted teacher folder; a ``:tiny`` config writes a random-weight one under the workdir first."""
  from dmd_jax.convert import edm as edm_convert
  t = config.teacher
  if t.path:
    return t.path
  if not t.random_init_kwargs:
    raise ValueError("teacher.path is empty: convert a teacher first (python -m dmd_jax.convert edm "
                     "--src=... --dst=DIR) and pass --config.teacher.path=DIR")
  if workdir is None:
    raise ValueError("a random-weight teacher (teacher.random_init_kwargs) needs a workdir to be written to")
  path = os.path.join(workdir, "random_teacher")
  if not os.path.exists(os.path.join(path, "config.json")) and jax.process_index() == 0:
    kwargs = json.loads(t.random_init_kwargs)
    edm_convert.write_random_teacher(path, kwargs, seed=config.seed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("random teacher written")
  return path


def _build_edm(config, workdir):
  from dmd_jax.convert.edm import load_converted_edm
  schedule = schedules.from_config(config.schedule)
  path = _teacher_dir(config, workdir)
  teacher, teacher_params = load_converted_edm(path)
  student, _ = load_converted_edm(path, dtype=_DTYPES[config.model.dtype], remat=config.model.remat)
  res, ch, label_dim = teacher.img_resolution, teacher.img_channels, teacher.label_dim
  sigma_gen = float(config.generator.sigma)

  def one_hot(cond):
    return None if not label_dim else jax.nn.one_hot(cond, label_dim, dtype=jnp.float32)

  def apply(module, params, x, sigma, cond):
    return module.apply({"params": params}, x, sigma, one_hot(cond))

  def generate(params, z, cond):
    return apply(student, params, sigma_gen * z, jnp.full((z.shape[0],), sigma_gen, jnp.float32), cond)

  def sample_cond(rng, n):
    return jax.random.randint(rng, (n,), 0, label_dim) if label_dim else None

  def teacher_sample(p, z, cond):
    return edm_heun_sample(lambda x, s: apply(teacher, p, x, s, cond), z, config.regression.sampler_steps,
                           schedule.sigma_min, schedule.sigma_max, schedule.rho)

  def init(rng):
    del rng  # both trainable networks start from the teacher
    copy = jax.tree.map(lambda a: jnp.array(a, jnp.float32), teacher_params)
    return copy, jax.tree.map(jnp.copy, copy)

  nets = DMDNetworks(
      schedule=schedule,
      generate=generate,
      real_denoise=lambda p, x_t, t, cond: apply(teacher, p, x_t, schedule.sigma(t), cond),
      fake_denoise=lambda p, x_t, t, cond: apply(student, p, x_t, schedule.sigma(t), cond),
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, res, res, ch), jnp.float32),
      sample_cond=sample_cond,
      teacher_sample=teacher_sample,
      init=init,
      sample_shape=(res, res, ch),
      num_classes=label_dim,
  )
  return nets, {"teacher": teacher_params}
