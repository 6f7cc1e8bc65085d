"""The modes other than training (``--mode=sample | teacher_sample | eval | pairs``): each builds the run
(``train.setup``), reads the latest checkpoint where it needs the generator, and writes its outputs through
``io`` (atomic; local paths and ``gs://`` alike)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import checkpoint, io, sharding, streams, train, writers
from dmd_jax.evaluation import evaluators as evaluators_lib
from dmd_jax.evaluation import images as image_io
from dmd_jax.evaluation import sampling


def latest_generator(run: train.Run, step: int | None = None):
  """``(generator state, step)`` of the latest checkpoint in the workdir, or of checkpoint ``step`` (one that
  exists: ``export_lib.choose_step``); a clear error when there is none."""
  ckpt = checkpoint.Checkpointer(run.workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (same --workdir)")
    state, _ = run.restore(ckpt, step)
  finally:
    ckpt.close()
  return state["generator"], step


def _check_npz(output: str) -> None:
  if not output.endswith(".npz"):
    raise ValueError(f"--output must be a .npz file, got {output!r}")


def _write_samples(run: train.Run, output: str, x: np.ndarray, cond: np.ndarray, **extra) -> None:
  """Image teachers: uint8 NHWC ``samples`` (decoded); others: float ``samples`` [N, D]; plus what the
  conditions record (class ``labels``) and ``extra``."""
  if not run.is_main:
    return
  out = sampling.to_outputs(run, x)
  arrays = {"samples": image_io.to_uint8(out) if run.teacher.images else out, **extra,
            **run.teacher.conditions.record(cond)}
  io.write_npz(output, **arrays)


def sample(config, workdir: str, num_samples: int, output: str, seed: int, prompt: str | None = None) -> str:
  """Writes ``num_samples`` samples (``generator.steps``; one step by default) of the latest checkpoint to ``output`` (.npz), deterministic for
  ``seed``; with ``prompt`` (text-to-image teachers) a PNG grid instead (:func:`sample_prompt`)."""
  if prompt is not None:
    return sample_prompt(config, workdir, prompt, num_samples, output, seed)
  run = train.setup(config, workdir)
  if run.teacher.conditions.text:
    raise ValueError(f"--mode=sample for this text-to-image teacher ({run.teacher.name!r}) needs "
                     "--prompt=\"...\" (and --output=FILE.png)")
  _check_npz(output)
  gen_state, step = latest_generator(run)
  x, cond = sampling.generate(run, run.generator_params(gen_state), num_samples, jax.random.PRNGKey(seed))
  _write_samples(run, output, x, cond, step=step, seed=seed, nfe=run.generator_nfe)
  print(f"wrote {num_samples} samples of step {step} to {output}")
  return output


def sample_prompt(config, workdir: str, prompt: str, num_samples: int, output: str, seed: int) -> str:
  """Text-to-image: ``num_samples`` one-step images of the latest checkpoint for ``prompt`` (decoded), as one
  PNG grid at ``output``; image i uses the noise of ``fold_in(key(seed), i)``, so the grid depends on ``seed``
  only (not on the device count or how many images come before it)."""
  if not output.lower().endswith(".png"):
    raise ValueError(f"--output must be a .png file for --prompt, got {output!r}")
  if num_samples < 1:
    raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
  run = train.setup(config, workdir)
  teacher = run.teacher
  cond = jnp.asarray(teacher.conditions.encode_text([prompt]), jnp.float32)       # [1, L, D]
  gen_state, step = latest_generator(run)
  key = jax.random.PRNGKey(seed)
  z = jax.vmap(lambda i: teacher.sample_noise(jax.random.fold_in(key, i), 1)[0])(jnp.arange(num_samples))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), 1))(jnp.arange(num_samples))
  gen = jax.jit(lambda p, z, c, k: run.sample(p, z, jnp.broadcast_to(c, (z.shape[0],) + c.shape[1:]), k))
  params = run.generator_params(gen_state)
  x = np.concatenate([np.asarray(jax.device_get(gen(params, z[i:i + 16], cond, keys[i:i + 16])))
                      for i in range(0, num_samples, 16)])
  images = image_io.to_uint8(sampling.to_outputs(run, x))
  if run.is_main:
    image_io.save_png(output, image_io.grid(images, int(np.ceil(np.sqrt(num_samples)))))
  print(f"wrote {num_samples} images ({run.generator_nfe} NFE) of step {step} for {prompt!r} to {output}")
  return output


def sample_teacher(config, workdir: str, num_samples: int, output: str, seed: int) -> str:
  """Writes ``num_samples`` samples of the teacher's sampler (baselines) in the ``--mode=sample`` format."""
  _check_npz(output)
  run = train.setup(config, workdir)
  x, cond = sampling.teacher_samples(run, num_samples, jax.random.PRNGKey(seed))
  _write_samples(run, output, x, cond, seed=seed, nfe=run.teacher.sampler.nfe)
  print(f"wrote {num_samples} teacher samples to {output}")
  return output


def evaluate(config, workdir: str, at_init: bool = False) -> dict:
  """The config's evaluators on the latest checkpoint; results in ``eval_step<N>.json``. ``at_init``: on the
  untrained generator instead (``eval_init.json``; the generator starts as the teacher, so for EDM and SD
  teachers this measures the teacher's one-step sample, ``D(sigma_max z; sigma_max)``)."""
  run = train.setup(config, workdir)
  if at_init:   # the generator's initial parameters alone (not the whole train state with optimiser states)
    key = streams.key(run.config.seed, "init")
    init = lambda k, frozen: run.teacher.init(k, frozen)[0]   # copied from the teacher on the mesh
    # the whole network (a LoRA run's generator at init: the teacher itself, its adapters being zero)
    shapes = jax.eval_shape(init, key, run.frozen)
    shardings = sharding.tree_sharding(run.mesh, shapes, run.config.mesh.min_shard_size)
    params = jax.jit(init, in_shardings=(sharding.replicated(run.mesh), run.frozen_sharding),
                     out_shardings=shardings)(key, run.frozen)
    step = 0
  else:
    gen_state, step = latest_generator(run)
    params = run.generator_params(gen_state)
  writer = writers.create_writer(run.workdir, run.is_main)
  results = evaluators_lib.run_all(run, evaluators_lib.build(run, writer), params, step, final=True)
  if run.is_main:
    io.write_json(io.join(run.workdir, "eval_init.json" if at_init else f"eval_step{step}.json"), results)
  writer.flush()
  print(json.dumps(evaluators_lib.summary(results), indent=1))
  return results


def pairs(config, workdir: str) -> None:
  """Builds the regression set (docs/method.md §5) without training."""
  run = train.setup(config, workdir)
  n = len(train.ensure_pairs(run))
  print(f"regression set complete: {n} pairs in {io.join(run.workdir, 'pairs')}")
