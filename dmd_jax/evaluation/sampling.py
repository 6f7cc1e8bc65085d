"""Samples of the generator or the teacher's sampler over the mesh, in chunks, for the evaluators and the
modes. Chunk ``i`` draws its noise and conditions from ``fold_in(key, i)``, so the samples depend on the key
and the chunk size only, not on the device count."""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import numpy as np

from dmd_jax import sharding


def teacher_fn(run) -> Callable:
  """The teacher's sampler in the signature :func:`sample_chunks` takes (it needs no further noise)."""
  return lambda params, z, cond, keys: run.teacher.sampler.sample(params, z, cond)


def sample_chunks(run, fn: Callable, params, num: int, key, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields host ``(x, cond)`` chunks of ``fn(params, z, cond, keys)`` (``run.sample`` with generator
  parameters, or :func:`teacher_fn` with ``frozen['teacher']``) over fresh noise and conditions; ``keys`` [chunk]
  seed a multi-step generator's noise between steps."""
  teacher = run.teacher
  batch = sharding.batch_sharding(run.mesh)
  n_dev = run.mesh.devices.size
  chunk = -(-min(chunk, num) // n_dev) * n_dev

  @functools.partial(jax.jit, out_shardings=batch)
  def one(params, key):
    r_z, r_c = jax.random.split(key)
    z = jax.lax.with_sharding_constraint(teacher.sample_noise(r_z, chunk), batch)
    cond = teacher.conditions.draw(r_c, chunk)
    return fn(params, z, cond, jax.random.split(jax.random.fold_in(key, 1), chunk)), cond

  for i in range(-(-num // chunk)):
    with jax.set_mesh(run.mesh):   # traced under the mesh: activation sharding, TPU flash attention
      x, c = one(params, jax.random.fold_in(key, i))
    keep = min(chunk, num - i * chunk)
    yield sharding.gather(x)[:keep], sharding.gather(c)[:keep]


def collect(chunks) -> tuple[np.ndarray, np.ndarray]:
  xs, cs = zip(*chunks)
  return np.concatenate(xs), np.concatenate(cs)


def generate(run, params, num: int, key, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """``num`` samples of the generator (``generator.steps``) and their conditions, deterministic for ``key``."""
  return collect(sample_chunks(run, run.sample, params, num, key, chunk))


def teacher_samples(run, num: int, key, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """``num`` samples of the teacher's sampler (the same noise / condition recipe as :func:`generate`)."""
  return collect(sample_chunks(run, teacher_fn(run), run.frozen["teacher"], num, key, chunk))


def to_outputs(run, x: np.ndarray, chunk: int = 64) -> np.ndarray:
  """Samples → outputs on the host: images in [-1, 1] for image teachers (latent teachers decode with their
  VAE, ``teacher.decode``), the samples themselves otherwise."""
  if not run.teacher.images:
    return np.asarray(x)
  if "decode" not in run.cache:
    run.cache["decode"] = jax.jit(run.teacher.decode)
  decode = run.cache["decode"]
  return np.concatenate([sharding.gather(decode(run.frozen, x[i:i + chunk])) for i in range(0, len(x), chunk)])
