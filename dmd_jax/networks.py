"""What the method drives, built from a config: ``DMDNetworks`` bundles the schedule, the one-step
generator, the real (teacher) and fake x0-denoisers, the noise / condition samplers and the teacher's
ODE sampler. ``dmd.py`` only ever sees this interface. One builder per model family: ``toy`` (analytic 2-D
teacher), ``edm`` (EDM pixel-space teachers: CIFAR-10, ImageNet-64), ``sd`` (Stable Diffusion 1.x latent
teachers with classifier-free guidance and text conditions: ``configs/coco.py``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

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
  # Families whose conditions come from a finite host-side set (SD: prompt embeddings). The loop draws ids
  # per step (deterministic in the step) and passes ``cond_table(ids)`` as the batch's ``cond``; regression
  # pairs store the id (``pair_cond(indices)``) and the loop looks its condition up the same way.
  cond_table: Callable = None   # host: int ids [n] -> conditions [n, ...]
  num_conds: int = 0            # size of that set
  pair_cond: Callable = None    # host: pair indices -> the ids stored with the pairs
  decode: Callable = None       # (frozen, x) -> images in [-1, 1] (latent families: the VAE decoder)
  encode_text: Callable = None  # host: list of prompts -> conditions (text-to-image families)
  pair_spec: tuple = ()         # extra (key, value) items of the regression-pair spec
  teacher_nfe: int = 0          # network evaluations per teacher sample (0: EDM Heun's 2N - 1)


def build(config, workdir: str | None = None) -> tuple[DMDNetworks, dict]:
  """Returns ``(nets, frozen)``; ``frozen['teacher']`` holds the teacher's parameters (for 'sd': the UNet's and
  the empty-prompt embedding), ``frozen['regression']`` those of the regression distance (for 'sd': LPIPS and
  the VAE that decodes latents for it and for pictures).

  ``workdir`` is where a ``:tiny`` config writes its random-weight teacher (and 'sd' caches its prompt
  embeddings).
  """
  family = config.model.family
  if family == "toy":
    return _build_toy(config)
  if family == "edm":
    return _build_edm(config, workdir)
  if family == "sd":
    return _build_sd(config, workdir)
  raise ValueError(f"model.family {family!r} is not known; expected one of: 'toy', 'edm', 'sd'")


def _simple_distance(name: str) -> Callable:
  from dmd_jax import dmd
  if name not in dmd.REGRESSION_DISTANCES:
    raise ValueError(f"regression.distance must be one of {sorted(dmd.REGRESSION_DISTANCES)} here, got {name!r}")
  return dmd.REGRESSION_DISTANCES[name]


def image_distance(config) -> Callable:
  """The regression distance of image families, ``(params, x, y) -> [N]``: 'lpips' (the papers': VGG LPIPS
  after bilinear upsampling to ``regression.lpips_resize``; ``params`` the LPIPS weights), or 'l2' / 'mse'."""
  r = config.regression
  if r.distance != "lpips":
    return _simple_distance(r.distance)
  from dmd_jax.models.lpips import LPIPS, lpips_distance
  module, resize = LPIPS(), int(r.lpips_resize)
  return lambda p, x, y: lpips_distance(module, p, x, y, resize_to=resize)


def _distance_params(config, workdir) -> dict:
  """The frozen parameters of ``image_distance(config)``: the LPIPS weights read from
  ``regression.lpips_path`` (a random-weight stand-in written under the workdir for 'random'); ``{}`` for
  'l2' / 'mse'."""
  r = config.regression
  if r.distance != "lpips":
    return {}
  from dmd_jax.convert import lpips as lpips_convert
  path = frozen_network_dir(r.lpips_path, "regression.lpips_path", "lpips", workdir, config.seed,
                            lambda dst: _write_random(dst, lpips_convert._trunk_expected("torchvision"),
                                                      lpips_convert.convert_file, config.seed))
  return lpips_convert.load_converted_lpips(path)[1]


def _write_random(dst, shapes, convert_file, seed):
  from dmd_jax.convert.common import write_random_network
  write_random_network(dst, shapes, convert_file, seed)


def frozen_network_dir(path: str, field: str, family: str, workdir: str | None, seed: int, write_random,
                       marker: str = "config.json") -> str:
  """The folder of a converted frozen network (``python -m dmd_jax.convert FAMILY``). ``path='random'`` asks
  for a random-weight stand-in (the ``:tiny`` configs), written once under the workdir (``marker`` is the
  file written last, whose presence means the folder is complete)."""
  if path and path != "random":
    return path
  if not path:
    raise ValueError(f"{field} is empty: convert the network first (python -m dmd_jax.convert {family} "
                     f"--src=... --dst=DIR) and pass --config.{field}=DIR")
  if workdir is None:
    raise ValueError(f"{field}='random' needs a workdir to write the random-weight network to")
  dst = os.path.join(workdir, f"random_{family}")
  if not os.path.exists(os.path.join(dst, marker)) and jax.process_index() == 0:
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


def _teacher_copies(teacher_params) -> Callable:
  """``DMDNetworks.init`` of the families whose generator and fake score both start from the teacher:
  ``rng -> (float32 copy, float32 copy)`` of ``teacher_params``."""
  def init(rng):
    del rng
    copy = jax.tree.map(lambda a: jnp.array(a, jnp.float32), teacher_params)
    return copy, jax.tree.map(jnp.copy, copy)
  return init


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
  distance, distance_params = image_distance(config), _distance_params(config, workdir)

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

  nets = DMDNetworks(
      schedule=schedule,
      generate=generate,
      real_denoise=lambda p, x_t, t, cond: apply(teacher, p, x_t, schedule.sigma(t), cond),
      fake_denoise=lambda p, x_t, t, cond: apply(student, p, x_t, schedule.sigma(t), cond),
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, res, res, ch), jnp.float32),
      sample_cond=sample_cond,
      teacher_sample=teacher_sample,
      init=_teacher_copies(teacher_params),
      sample_shape=(res, res, ch),
      num_classes=label_dim,
      regression_distance=distance,
  )
  return nets, {"teacher": teacher_params, "regression": distance_params}


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion v1.5 (text-to-image, method.md §2–5): a VP (scaled-linear) epsilon-prediction teacher in
# latent space. Generator: the UNet at t = generator.timestep (999) on unit-noise latents, eps -> x0 in
# float32. Real score: the frozen teacher UNet with classifier-free guidance
# ``eps_u + g (eps_c - eps_u)`` (g = guidance_scale, uncond = the empty prompt's embedding, in frozen
# params); fake score: the trainable copy, never guided. Conditions: CLIP text embeddings [N, L, D] of the
# training prompts (dmd_jax/data/prompts.py). Regression: LPIPS between VAE-decoded images.
# ---------------------------------------------------------------------------------------------------------

def classifier_free_guidance(eps_fn: Callable, x_t, t, cond, uncond, guidance_scale: float):
  """``eps_u + g (eps_c - eps_u)`` in float32 from one batched ``eps_fn(x, t, c)`` call on
  ``[uncond; cond]`` rows (``t`` int [N]; ``uncond`` broadcast to ``cond``). ``g = 1`` is the plain
  conditional prediction (one call on ``cond`` only)."""
  if guidance_scale == 1.0:
    return eps_fn(x_t, t, cond).astype(jnp.float32)
  n = x_t.shape[0]
  uncond = jnp.broadcast_to(jnp.asarray(uncond, cond.dtype), cond.shape)
  eps = eps_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0),
               jnp.concatenate([uncond, cond], axis=0)).astype(jnp.float32)
  eps_u, eps_c = eps[:n], eps[n:]
  return eps_u + jnp.float32(guidance_scale) * (eps_c - eps_u)


def sd_real_denoiser(unet, schedule, guidance_scale: float) -> Callable:
  """The real score of an SD teacher as an x0-predictor: ``(p, x_t, t, cond) -> x0`` with
  ``p = {'unet': params, 'uncond': [1, L, D] empty-prompt embedding}`` and guidance ``g`` (eps -> x0 in
  float32)."""
  def real_denoise(p, x_t, t, cond):
    eps = classifier_free_guidance(lambda x, tt, c: unet.apply({"params": p["unet"]}, x, tt, c), x_t, t, cond,
                                   p["uncond"], guidance_scale)
    return schedule.eps_to_x0(x_t, eps, t)
  return real_denoise


def _sd_teacher_dir(config, workdir):
  """The folder written by ``python -m dmd_jax.convert sd``; ``teacher.path='random'`` writes a tiny
  random-weight pipeline (``convert.sd.write_random_pipeline``) under the workdir and converts it."""
  from dmd_jax.convert import sd as sd_convert
  return frozen_network_dir(config.teacher.path, "teacher.path", "sd", workdir, config.seed,
                            lambda dst: sd_convert.write_random_converted(dst, seed=config.seed),
                            marker=os.path.join("text_encoder", "config.json"))


def _sd_schedule(config) -> schedules.VPSchedule:
  schedule = schedules.from_config(config.schedule)
  if not isinstance(schedule, schedules.VPSchedule):
    raise ValueError(f"model.family='sd' needs schedule.kind='vp', got {type(schedule).__name__}")
  return schedule


def _check_sd_schedule(schedule, scheduler_config, path):
  """The converted pipeline's scheduler must be the epsilon-prediction scaled-linear schedule configured."""
  if scheduler_config is None:
    return
  want = {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "beta_start": schedule.beta_start,
          "beta_end": schedule.beta_end, "num_train_timesteps": schedule.num_timesteps}
  for k, v in want.items():
    got = scheduler_config.get(k, "epsilon" if k == "prediction_type" else None)
    if got != v and not (isinstance(v, float) and isinstance(got, (int, float)) and abs(got - v) < 1e-12):
      raise ValueError(f"{path}/scheduler/scheduler_config.json has {k}={got!r}; this config expects {v!r} "
                       f"(schedule.* must describe the teacher's training schedule)")


def sd_networks(config, unet_config: dict, vae_config: dict, teacher_params, prompts,
                encode_text: Callable | None = None) -> DMDNetworks:
  """The ``DMDNetworks`` of an SD teacher, built from modules only (no I/O): what ``build`` returns for
  ``model.family='sd'`` once the converted pipeline and the prompts are at hand.

  ``unet_config`` / ``vae_config``: the converted pipeline's ``config.json`` dicts (e.g. ``convert.sd.SD15_UNET``);
  the teacher UNet and the VAE that writes images run in float32, the trainable UNet (generator and fake score,
  rematerialised when ``model.remat``) and the VAE inside the regression loss in ``model.dtype``.
  ``teacher_params``: the UNet's parameters, copied into both trainable networks by ``init`` (abstract values
  are fine when ``init`` is traced under ``jax.eval_shape``). ``prompts``: the condition source, a
  ``data.prompts.PromptSet`` or a stand-in with ``len()``, ``key``, ``lookup(ids)`` (host: ``[n, L, D]``) and
  ``eval_table(k)``; nothing is looked up here. ``encode_text``: host ``list of prompts -> [n, L, D]``.
  The frozen parameters these functions take are ``sd_frozen(...)``.
  """
  from dmd_jax.convert.sd import build_unet, build_vae
  from dmd_jax.samplers import ddim_sample, pndm_sample
  schedule = _sd_schedule(config)
  dtype = _DTYPES[config.model.dtype]
  teacher = build_unet(unet_config)[0]
  student = build_unet(unet_config, dtype=dtype, remat=bool(config.model.remat))[0]
  vae_out = build_vae(vae_config)[0]                      # float32: the images written out
  vae_train = build_vae(vae_config, dtype=dtype)[0]       # model dtype: inside the regression loss
  scaling = float(vae_config.get("scaling_factor", 0.18215))
  res = int(config.model.get("latent_resolution", 0) or unet_config.get("sample_size", 64))
  ch = int(teacher.config.in_channels)
  g = float(config.guidance_scale)
  t_gen = int(config.generator.timestep)
  if not 0 <= t_gen < schedule.num_timesteps:
    raise ValueError(f"generator.timestep must be in [0, {schedule.num_timesteps}), got {t_gen}")

  def eps_of(module, params):
    return lambda x, t, c: module.apply({"params": params}, x, t, c)

  def generate(params, z, cond):
    t = jnp.full((z.shape[0],), t_gen, jnp.int32)
    return schedule.eps_to_x0(z, eps_of(student, params)(z, t, cond), t)

  def fake_denoise(p, x_t, t, cond):
    return schedule.eps_to_x0(x_t, eps_of(student, p)(x_t, t, cond), t)

  sampler = config.regression.get("sampler", "pndm")
  if sampler not in ("pndm", "ddim"):
    raise ValueError(f"regression.sampler must be 'pndm' or 'ddim' for model.family='sd', got {sampler!r}")
  steps = int(config.regression.sampler_steps)
  sample_fn = pndm_sample if sampler == "pndm" else ddim_sample

  def teacher_sample(p, z, cond):
    return sample_fn(eps_of(teacher, p["unet"]), z, cond, p["uncond"], num_steps=steps, guidance_scale=g,
                     alphas_cumprod=schedule.alphas_cumprod)

  def decode_with(module):
    return lambda vae_p, x: module.apply({"params": vae_p}, x / scaling, method="decode")

  decode_train = decode_with(vae_train)
  r = config.regression
  base_distance = image_distance(config)
  if r.distance == "lpips":
    def distance(p, x, y):   # LPIPS between decoded images (method.md §5)
      return base_distance(p["lpips"], decode_train(p["vae"], x),
                           decode_train(p["vae"], jax.lax.stop_gradient(y)))
  else:                      # 'l2' / 'mse' on the latents
    distance = lambda p, x, y: base_distance(None, x, y)

  def sample_cond(rng, n):   # sample grids / FID: prompts drawn from the first 64 training prompts
    table = prompts.eval_table(64)
    return table[jax.random.randint(rng, (n,), 0, table.shape[0])]

  nfe = (steps + 1 if sampler == "pndm" else steps) * (1 if g == 1.0 else 2)
  return DMDNetworks(
      schedule=schedule,
      generate=generate,
      real_denoise=sd_real_denoiser(teacher, schedule, g),
      fake_denoise=fake_denoise,
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, res, res, ch), jnp.float32),
      sample_cond=sample_cond,
      teacher_sample=teacher_sample,
      init=_teacher_copies(teacher_params),
      sample_shape=(res, res, ch),
      regression_distance=distance,
      cond_table=prompts.lookup,
      num_conds=len(prompts),
      pair_cond=lambda idx: (np.asarray(idx, np.int64) % len(prompts)).astype(np.int32),
      decode=lambda frozen, x: decode_with(vae_out)(frozen["regression"]["vae"], x),
      encode_text=encode_text,
      pair_spec=(("sampler", sampler), ("guidance_scale", g), ("prompts", prompts.key)),
      teacher_nfe=nfe,
  )


def sd_frozen(unet_params, uncond, vae_params, distance_params) -> dict:
  """The frozen parameters of an SD teacher's ``DMDNetworks``: the teacher UNet and the empty prompt's
  embedding ``uncond`` [1, L, D] (the real score's guidance), the VAE and the regression distance's
  parameters (LPIPS; ``{}`` for 'l2' / 'mse')."""
  return {"teacher": {"unet": unet_params, "uncond": uncond},
          "regression": {"vae": vae_params, "lpips": distance_params}}


def _build_sd(config, workdir):
  """Reads the converted pipeline (``teacher.path``), the LPIPS weights and the prompts, then
  ``sd_networks``."""
  from dmd_jax.convert.sd import load_converted_sd
  from dmd_jax.data.prompts import PromptSet, TextEncoder, prompts_from_config
  path = _sd_teacher_dir(config, workdir)
  teacher_sd = load_converted_sd(path)
  _check_sd_schedule(_sd_schedule(config), teacher_sd["scheduler_config"], path)
  teacher, teacher_params = teacher_sd["unet"]
  text_module, text_params = teacher_sd["text_encoder"]
  if text_module.config.hidden_size != teacher.config.cross_attention_dim[0]:
    raise ValueError(f"{path}: the text encoder's width {text_module.config.hidden_size} is not the UNet's "
                     f"cross_attention_dim {teacher.config.cross_attention_dim[0]}")
  encoder = TextEncoder(text_module, text_params, teacher_sd["tokenizer"], config.data.embedding_batch_size)
  prompts = PromptSet(prompts_from_config(config.data), encoder, workdir, os.path.abspath(path),
                      config.data.embedding_dtype)
  uncond = encoder([""])                                  # [1, L, D]: the empty prompt (guidance)
  distance_params = _distance_params(config, workdir)
  nets = sd_networks(config, teacher_sd["configs"]["unet"], teacher_sd["configs"]["vae"], teacher_params,
                     prompts, encode_text=lambda texts: encoder(list(texts)))
  return nets, sd_frozen(teacher_params, uncond, teacher_sd["vae"][1], distance_params)
