"""What every teacher family hands the method, the loop, the evaluators and the modes (docs/architecture.md).

A family module (``toy``, ``edm``, ``sd``) turns a config into one :class:`Teacher` and its frozen parameters.
Nothing outside ``dmd_jax/families/`` knows which family it drives: ``dmd.py`` sees the schedule, the
generator, the two denoisers, the noise and the conditions; the loop and the modes also see the teacher's
sampler, the decoder to outputs and the regression distance. No field is optional.

Frozen parameters are one dict: ``'teacher'`` (the teacher network's, FSDP-sharded like the trainable state)
and whatever else the family's functions read (LPIPS, a VAE: replicated; ``sharding.frozen_sharding``). A
family's ``build`` returns them as host arrays; ``train.build`` places them on the mesh, and nothing keeps the host
ones after that: the Teacher's functions close over shapes at most (:func:`abstract`), and ``Teacher.init``
copies the teacher from the placed arrays it is given (:func:`teacher_copies`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import dmd, pretrained, streams
from dmd_jax.data.indexed import EpochSampler
from dmd_jax.models.gan_head import ConvGANHead
from dmd_jax.models.lpips import LPIPS, lpips_distance


# ---------------------------------------------------------------------------------------------------------
# Conditions: what one sample is conditioned on (nothing, a class label, a prompt).
# ---------------------------------------------------------------------------------------------------------

class Conditions(Protocol):
  """The condition source of a teacher. Conditions are always arrays (unconditional teachers use int32
  zeros that their networks ignore), so no caller tests for their absence.

  - ``draw(rng, n)`` (inside jit): the conditions of ``n`` generated samples (training, pictures, FID).
  - ``for_step(step, batch_size, rows)`` (host): extra inputs of train step ``step`` — ``{'cond': rows of the
    DM batch's conditions}`` when they come from a host-side table (prompt embeddings), ``{}`` when the
    step draws them itself with ``draw``. Deterministic in ``step``, so a resumed run repeats them.
  - ``for_pairs(indices)`` (host): the int32 id stored with each regression pair (its label or prompt id).
  - ``lookup(ids)`` (host): stored ids → what the networks take (labels as they are; prompt embeddings).
  - ``record(cond)`` (host): what ``--mode=sample`` writes beside the samples (``{'labels': ...}`` or ``{}``).
  - ``encode_text(texts)`` (host): prompts → conditions; a clear error for teachers without text.
  - ``spec``: what identifies the conditions of a regression-pair set (part of its spec).
  - ``text``: whether the conditions are text prompts (``--mode=sample`` then takes ``--prompt``).
  """

  spec: dict
  text: bool

  def draw(self, rng, n: int) -> jax.Array: ...
  def for_step(self, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]: ...
  def for_pairs(self, indices: np.ndarray) -> np.ndarray: ...
  def lookup(self, ids: np.ndarray) -> np.ndarray: ...
  def record(self, cond: np.ndarray) -> dict[str, np.ndarray]: ...
  def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...


def _no_text(texts):
  raise ValueError("this teacher takes no text prompts: --prompt needs a text-to-image config "
                   "(e.g. configs/coco.py)")


@dataclasses.dataclass(frozen=True)
class Unconditional:
  """No conditions: int32 zeros."""
  spec: dict = dataclasses.field(default_factory=dict)
  text: bool = False

  def draw(self, rng, n):
    return jnp.zeros((n,), jnp.int32)

  def for_step(self, step, batch_size, rows):
    return {}

  def for_pairs(self, indices):
    return np.zeros((len(indices),), np.int32)

  def lookup(self, ids):
    return np.asarray(ids, np.int32)

  def record(self, cond):
    return {}

  encode_text = staticmethod(_no_text)


@dataclasses.dataclass(frozen=True)
class ClassLabels:
  """Integer class labels in ``[0, num_classes)``, drawn uniformly; pair ``i``'s label comes from
  ``fold_in(key(seed, 'pair_conditions'), i)``."""
  num_classes: int
  seed: int
  spec: dict = dataclasses.field(default_factory=dict)
  text: bool = False

  def draw(self, rng, n):
    return jax.random.randint(rng, (n,), 0, self.num_classes)

  def for_step(self, step, batch_size, rows):
    return {}

  def for_pairs(self, indices):
    key = streams.key(self.seed, "pair_conditions")
    k = self.num_classes
    return np.asarray(jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, k))(
        jnp.asarray(indices, jnp.uint32)), np.int32)

  def lookup(self, ids):
    return np.asarray(ids, np.int32)

  def record(self, cond):
    return {"labels": np.asarray(cond, np.int32)}

  encode_text = staticmethod(_no_text)


class PromptConditions:
  """Text conditions: the CLIP embeddings of a prompt set (``data.prompts.PromptSet``, or any object with
  ``len()``, ``key``, ``lookup(ids)`` and ``eval_table(k)``). Training steps take prompt ids in epoch order
  (``EpochSampler`` on the ``'condition_order'`` stream); pictures and FID draw from the first 64 prompts;
  pair ``i`` uses prompt ``i mod P``."""
  text = True

  def __init__(self, prompts, seed: int, encode_text: Callable[[list[str]], np.ndarray]):
    self.prompts, self.seed, self._encode = prompts, seed, encode_text
    self.spec = {"prompts": prompts.key}
    self._samplers: dict[int, EpochSampler] = {}

  def draw(self, rng, n):
    table = self.prompts.eval_table(64)
    return table[jax.random.randint(rng, (n,), 0, table.shape[0])]

  def for_step(self, step, batch_size, rows):
    if batch_size not in self._samplers:
      self._samplers[batch_size] = EpochSampler(len(self.prompts), batch_size,
                                                streams.numpy_seed(self.seed, "condition_order"))
    return {"cond": self.prompts.lookup(self._samplers[batch_size].indices(step)[rows])}

  def for_pairs(self, indices):
    return (np.asarray(indices, np.int64) % len(self.prompts)).astype(np.int32)

  def lookup(self, ids):
    return self.prompts.lookup(ids)

  def record(self, cond):
    return {}

  def encode_text(self, texts):
    return np.asarray(self._encode(list(texts)), np.float32)


# ---------------------------------------------------------------------------------------------------------
# The teacher.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TeacherSampler:
  """The teacher's own sampler (an ODE solver): ``sample(frozen_teacher, z, cond) -> x``, its network
  evaluations per sample (``nfe``), and what identifies its samples in a regression-pair spec."""
  sample: Callable
  nfe: int
  spec: dict


@dataclasses.dataclass(frozen=True)
class Critic:
  """DMD2's GAN discriminator (docs/method.md §7): a head on the fake score network's bottleneck.

  ``features(fake_params, x_t, t, cond)`` → the fake network's bottleneck at (x_t, t) (under ``jit`` only the
  layers up to it are computed); ``init(rng)`` → head parameters; ``logits(head_params, features)`` → [N]
  float32. The real score never gets a head."""
  features: Callable
  init: Callable
  logits: Callable


def conv_critic(features: Callable, feature_shape: Callable) -> Critic:
  """The image families' critic: :class:`~dmd_jax.models.gan_head.ConvGANHead` on ``features``;
  ``feature_shape()`` gives the bottleneck's ``[H, W, C]`` (to initialise the head)."""
  head = ConvGANHead()

  def init(rng):
    return head.init(rng, jnp.zeros((1, *feature_shape()), jnp.float32))["params"]
  return Critic(features=features, init=init, logits=lambda p, f: head.apply({"params": p}, f))


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One teacher family's networks and data, as functions of parameters (docs/architecture.md).

  ``generate(generator_params, z, cond) -> x`` (from pure noise); ``generate_at(generator_params, x_t, t, cond)
  -> x0``: the generator at timestep ``t`` (the later steps of a multi-step generator, docs/method.md §7);
  ``real_denoise(frozen['teacher'], x_t, t, cond) -> x0``
  (classifier-free guidance inside, where the family has it); ``fake_denoise(fake_params, x_t, t, cond)``;
  ``sample_noise(rng, n) -> z``; ``init(rng, frozen) -> (generator_params, fake_params)``: the initial
  trainable parameters, copies of ``frozen['teacher']``'s network where the generator starts as the teacher
  (:func:`teacher_copies`; ``frozen`` as placed on the mesh, or abstract under ``jax.eval_shape``; the toy
  family ignores it), so that no family keeps the host parameters ``build`` returned;
  ``regression_distance(frozen, x, y) -> [N]`` (docs/method.md §5); ``decode(frozen, x)`` → outputs: images
  in [-1, 1] when ``images`` (latent teachers decode with their VAE), the samples themselves otherwise;
  ``critic``: DMD2's GAN head on the fake network (:class:`Critic`); ``lora``: what LoRA adapts (``dmd_jax/lora.py``);
  ``encode(frozen, images)`` the inverse of ``decode`` for real data (DMD2's critic, docs/method.md §7): images in [-1, 1] →
  samples in the teacher's space (pixel teachers: the images; SD: the VAE posterior mean × scaling factor).
  """
  name: str
  schedule: Any
  generate: Callable
  generate_at: Callable
  real_denoise: Callable
  fake_denoise: Callable
  sample_noise: Callable
  init: Callable
  conditions: Conditions
  sampler: TeacherSampler
  regression_distance: Callable
  decode: Callable
  encode: Callable
  critic: Critic
  images: bool
  sample_shape: tuple
  lora: Any    # lora.Base: the teacher network among the frozen parameters and its module names; None where the
               # generator is not a copy of the teacher network (toy)


def abstract(tree):
  """The ``jax.ShapeDtypeStruct`` of every array of ``tree``: what shape-only closures (a critic's
  ``feature_shape``) keep instead of the arrays, so that no closure holds a host copy of a network."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def teacher_copies(network: Callable[[dict], Any]) -> Callable:
  """``Teacher.init`` of the families whose generator and fake score both start from the teacher
  (docs/method.md §2): ``(rng, frozen) -> (float32 copy, float32 copy)`` of ``network(frozen)``, the teacher
  network among the frozen parameters. It closes over no array: the copies come from the ``frozen`` it is
  given — the arrays on the mesh, as an argument of ``train.Run.init_state``'s jit, so no host copy of the
  teacher outlives ``train.build`` — or from abstract ones under ``jax.eval_shape`` (``train.build``, the
  compile-only bench scripts)."""
  def init(rng, frozen):
    del rng
    copy = jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), network(frozen))
    return copy, jax.tree.map(jnp.copy, copy)
  return init


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dtype(config):
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  return DTYPES[config.model.dtype]


def distance(config) -> Callable:
  """The regression distance ``(lpips_params, x, y) -> [N]`` (docs/method.md §5): 'lpips' (VGG LPIPS after
  bilinear upsampling to ``regression.lpips_resize``; the papers'), or 'l2' / 'mse' (``lpips_params``
  unused)."""
  r = config.regression
  if r.distance != "lpips":
    if r.distance not in dmd.REGRESSION_DISTANCES:
      raise ValueError(f"regression.distance must be 'lpips' or one of {sorted(dmd.REGRESSION_DISTANCES)}, "
                       f"got {r.distance!r}")
    return dmd.REGRESSION_DISTANCES[r.distance]
  module, resize = LPIPS(), int(r.lpips_resize)
  return lambda p, x, y: lpips_distance(module, p, x, y, resize_to=resize)


def distance_params(config, workdir: str | None) -> dict:
  """The frozen parameters of :func:`distance`: the LPIPS weights, or ``{}`` for 'l2' / 'mse'."""
  if config.regression.distance != "lpips":
    return {}
  return pretrained.lpips(config, workdir)


def abstract_distance_params(config) -> dict:
  """:func:`distance_params` as shapes (nothing read): the LPIPS-VGG16 parameters' ``jax.ShapeDtypeStruct``, or
  ``{}`` for 'l2' / 'mse'."""
  if config.regression.distance != "lpips":
    return {}
  image = jnp.zeros((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), image, image))["params"]
