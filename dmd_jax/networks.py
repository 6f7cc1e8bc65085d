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
  regression_distance: Callable = None   # (frozen['regression'], x, y) -> per-sample distance
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


def _simple_distance(name: str) -> Callable:
  from dmd_jax import dmd
  if name not in dmd.REGRESSION_DISTANCES:
    raise ValueError(f"regression.distance must be one of {sorted(dmd.REGRESSION_DISTANCES)} here, got {name!r}")
  return dmd.REGRESSION_DISTANCES[name]


def _image_distance(config, workdir) -> tuple[Callable, dict]:
  """The regression distance of image families: 'lpips' (the papers': VGG LPIPS after bilinear upsampling
  to ``regression.lpips_resize``), or 'l2' / 'mse'. Returns ``(distance, its frozen params)``."""
  r = config.regression
  if r.distance != "lpips":
    return _simple_distance(r.distance), {}
  from dmd_jax.convert import lpips as lpips_convert
  from dmd_jax.models.lpips import lpips_distance
  path = frozen_network_dir(r.lpips_path, "regression.lpips_path", "lpips", workdir, config.seed,
                            lambda dst: _write_random(dst, lpips_convert._trunk_expected("torchvision"),
                                                      lpips_convert.convert_file, config.seed))
  module, params = lpips_convert.load_converted_lpips(path)
  resize = int(r.lpips_resize)
  return (lambda p, x, y: lpips_distance(module, p, x, y, resize_to=resize)), params


def _write_random(dst, shapes, convert_file, seed):
  from dmd_jax.convert.common import write_random_network
  write_random_network(dst, shapes, convert_file, seed)


def frozen_network_dir(path: str, field: str, family: str, workdir: str | None, seed: int, write_random) -> str:
  """The folder of a converted frozen network (``python -m dmd_jax.convert FAMILY``). ``path='random'`` asks
  for a random-weight stand-in (the ``:tiny`` configs), written once under the workdir."""
  if path and path != "random":
    return path
  if not path:
    raise ValueError(f"{field} is empty: convert the network first (python -m dmd_jax.convert {family} "
                     f"--src=... --dst=DIR) and pass --config.{field}=DIR")
  if workdir is None:
    raise ValueError(f"{field}='random' needs a workdir to write the random-weight network to")
  dst = os.path.join(workdir, f"random_{family}")
  if not os.path.exists(os.path.join(dst, "config.json")) and jax.process_index() == 0:
    write_random(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"random {family} written")
  return dst


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
      regression_distance=_simple_distance(config.regression.distance),
  )
  return nets, {"teacher": {}}


# ---------------------------------------------------------------------------------------------------------
# EDM teachers (CIFAR-10, ImageNet-64): method.md §2. Real score, fake score and generator all start from the
# teacher; G(z, c) = D(sigma_gen z; sigma_gen, c) with sigma_gen = 80. Conditions are integer class labels,
# one-hot inside; generated samples draw them uniformly.
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _teacher_dir(config, workdir):
  """The converted teacher folder; ``teacher.path='random'`` (the ``:tiny`` configs) writes a random-weight
  teacher of ``teacher.random_init_kwargs`` under the workdir, through the real converter."""
  from dmd_jax.convert import edm as edm_convert
  t = config.teacher

  def write(dst):
    if not t.random_init_kwargs:
      raise ValueError("teacher.path='random' needs teacher.random_init_kwargs (a JSON EDM init_kwargs dict)")
    edm_convert.write_random_teacher(dst, json.loads(t.random_init_kwargs), seed=config.seed)

  return frozen_network_dir(t.path, "teacher.path", "edm", workdir, config.seed, write)


def _build_edm(config, workdir):
  from dmd_jax.convert.edm import load_converted_edm
  schedule = schedules.from_config(config.schedule)
  path = _teacher_dir(config, workdir)
  teacher, teacher_params = load_converted_edm(path)
  student, _ = load_converted_edm(path, dtype=_DTYPES[config.model.dtype], remat=config.model.remat)
  res, ch, label_dim = teacher.img_resolution, teacher.img_channels, teacher.label_dim
  sigma_gen = float(config.generator.sigma)
  distance, distance_params = _image_distance(config, workdir)

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
      regression_distance=distance,
  )
  return nets, {"teacher": teacher_params, "regression": distance_params}
