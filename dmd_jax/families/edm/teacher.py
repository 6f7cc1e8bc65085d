"""EDM pixel-space teachers (CIFAR-10, ImageNet-64; ``configs/cifar10.py``, ``configs/imagenet64.py``;
docs/method.md §2). Real score, fake score and generator all start from the teacher; the generator is
``G(z, c) = D(sigma_gen z; sigma_gen, c)`` with ``sigma_gen = generator.sigma`` (80). Conditions are integer
class labels (one-hot inside); the teacher's sampler is EDM's Heun with ``regression.sampler_steps`` steps."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from dmd_jax import io, lora, pretrained, schedules
from dmd_jax.families import base
from dmd_jax.families.edm import convert as edm_convert
from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs
from dmd_jax.samplers import edm_heun_sample


# The EDM networks' equivalents of the official DMD2 SDXL LoRA targets (EDM's module names): attention qkv / proj,
# the blocks' convolutions (their resampling included), skip connections and noise-embedding affines, and the
# noise-embedding MLP.
LORA_TARGETS = ("qkv", "proj", "conv0", "conv1", "skip", "affine", "map_layer0", "map_layer1")


def teacher_dir(config, workdir: str | None) -> str:
  """The converted teacher folder; ``teacher.path='random'`` (the ``:tiny`` configs) writes a random-weight
  teacher of ``teacher.random_init_kwargs`` under the workdir, through the real converter."""
  t = config.teacher

  def write(dst):
    if not t.random_init_kwargs:
      raise ValueError("teacher.path='random' needs teacher.random_init_kwargs (a JSON EDM init_kwargs dict)")
    edm_convert.write_random_teacher(dst, json.loads(t.random_init_kwargs), seed=config.seed)

  return pretrained.network_dir(t.path, "teacher.path", "edm", workdir, write)


def build(config, workdir: str | None) -> tuple[base.Teacher, dict]:
  """Reads the converted teacher (``teacher.path``) and the LPIPS weights, then :func:`edm_teacher`."""
  teacher, teacher_params = edm_convert.load_converted_edm(teacher_dir(config, workdir), attention=config.model.attention)
  return (edm_teacher(config, teacher, teacher_params),
          {"teacher": teacher_params, "lpips": base.distance_params(config, workdir)})


def abstract(config) -> tuple[base.Teacher, dict]:
  """The EDM teacher from its ``init_kwargs`` alone (:func:`init_kwargs`), frozen parameters as shapes
  (``families.abstract``)."""
  module = edm_module_from_kwargs(init_kwargs(config), attention=config.model.attention)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_inputs(module)))["params"]
  return edm_teacher(config, module, shapes), {"teacher": shapes, "lpips": base.abstract_distance_params(config)}


def init_kwargs(config) -> dict:
  """The teacher network's EDM ``init_kwargs``: the converted folder's (``teacher.path``), the random teacher's
  (``'random'``: ``teacher.random_init_kwargs``), or with no path the published checkpoint's that the config
  names (``teacher.architecture``)."""
  t = config.teacher
  if t.path == "random":
    return json.loads(t.random_init_kwargs)
  if t.path:
    return io.read_json(io.join(t.path, "config.json"))["init_kwargs"]
  if not t.get("architecture"):
    raise ValueError("teacher.path is empty and the config names no teacher.architecture (the EDM init_kwargs "
                     "JSON of the network to plan for)")
  return json.loads(t.architecture)


def edm_teacher(config, teacher, teacher_shapes) -> base.Teacher:
  """The ``Teacher`` of an EDM network (no I/O): ``teacher`` the float32 ``EDMPrecond`` module,
  ``teacher_shapes`` its parameters or their shapes (only shapes are kept: ``init`` copies the network from the
  frozen parameters it is given). The frozen parameters these functions take are ``{'teacher', 'lpips'}``."""
  schedule = schedules.from_config(config.schedule)
  # the trainable network: the same module in the model dtype (the parameters are read once: the frozen teacher's)
  student = teacher.clone(dtype=base.model_dtype(config), remat=config.model.remat)
  shapes = base.abstract(teacher_shapes)   # what the closures keep: no host copy of the teacher (base.Teacher)
  res, ch, label_dim = teacher.img_resolution, teacher.img_channels, teacher.label_dim
  sigma_gen = float(config.generator.sigma)
  distance = base.distance(config)

  def apply(module, params, x, sigma, cond, **kwargs):
    labels = jax.nn.one_hot(cond, label_dim, dtype=jnp.float32) if label_dim else None
    return module.apply({"params": params}, x, sigma, labels, **kwargs)

  def features(p, x_t, t, cond):   # the encoder output (DMD2's GAN head input, docs/method.md §7)
    return apply(student, p, x_t, schedule.sigma(t), cond, return_features=True)[1].astype(jnp.float32)

  def feature_shape():
    return jax.eval_shape(features, shapes, jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)).shape[1:]

  def generate(params, z, cond):
    return apply(student, params, sigma_gen * z, jnp.full((z.shape[0],), sigma_gen, jnp.float32), cond)

  steps = config.regression.sampler_steps

  def teacher_sample(p, z, cond):
    return edm_heun_sample(lambda x, s: apply(teacher, p, x, s, cond), z, steps,
                           schedule.sigma_min, schedule.sigma_max, schedule.rho)

  conditions = base.ClassLabels(label_dim, config.seed) if label_dim else base.Unconditional()
  out = base.Teacher(
      name="edm",
      schedule=schedule,
      generate=generate,
      generate_at=lambda p, x_t, t, cond: apply(student, p, x_t, schedule.sigma(t), cond),
      real_denoise=lambda p, x_t, t, cond: apply(teacher, p, x_t, schedule.sigma(t), cond),
      fake_denoise=lambda p, x_t, t, cond: apply(student, p, x_t, schedule.sigma(t), cond),
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, res, res, ch), jnp.float32),
      init=base.teacher_copies(lambda frozen: frozen["teacher"]),
      conditions=conditions,
      sampler=base.TeacherSampler(sample=teacher_sample, nfe=2 * steps - 1,
                                  spec={"sampler": "edm_heun", "sampler_steps": steps}),
      regression_distance=lambda frozen, x, y: distance(frozen["lpips"], x, y),
      decode=lambda frozen, x: x,
      encode=lambda frozen, images: images,
      critic=base.conv_critic(features, feature_shape),
      images=True,
      sample_shape=(res, res, ch),
      lora=lora.Base(params=lambda frozen: frozen["teacher"],
                     module_name=lambda path: edm_convert.torch_key(path).rsplit(".", 1)[0],
                     default_targets=LORA_TARGETS),
  )
  return out
