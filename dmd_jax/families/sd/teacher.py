"""Stable Diffusion 1.x teachers (text-to-image, ``configs/coco.py``; docs/method.md §2–5): a VP
(scaled-linear) epsilon-prediction teacher in latent space.

Generator: the UNet at ``t = generator.timestep`` (999) on unit-noise latents, eps → x0 in float32. Real score:
the frozen teacher UNet with classifier-free guidance ``eps_u + g (eps_c - eps_u)`` (``g = guidance_scale``,
the empty prompt's embedding as the unconditional input, in the frozen parameters); fake score: the trainable
copy, never guided. Conditions: CLIP text embeddings of the training prompts (``data/prompts.py``). Teacher
sampler: guided PNDM (or DDIM). Regression: LPIPS between VAE-decoded images; outputs are VAE-decoded.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from dmd_jax import io, lora, pretrained, schedules
from dmd_jax.data.prompts import PromptSet, TextEncoder, prompts_from_config
from dmd_jax.families import base
from dmd_jax.families.sd import convert as sdc
from dmd_jax.guidance import classifier_free_guidance
from dmd_jax.samplers import ddim_sample, pndm_sample


# The official DMD2 SDXL LoRA run's targets (diffusers module names; model.lora.targets = () uses them).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


def text_only(cond) -> tuple:
  """SD 1.x / 2.x: the condition is the text encoder's hidden states, the UNet's one conditioning input."""
  return (cond,)


def real_denoiser(unet, schedule, guidance_scale: float, unet_inputs: Callable = text_only) -> Callable:
  """The real score of an SD teacher as an x0-predictor: ``(p, x_t, t, cond) -> x0`` with
  ``p = {'unet': params, 'uncond': [1, ...] unconditional condition}`` and guidance ``g`` (eps → x0 in
  float32). ``unet_inputs(cond)``: the UNet's conditioning arguments (:func:`text_only`; SDXL adds its
  pooled embedding and time ids)."""
  def real_denoise(p, x_t, t, cond):
    eps = classifier_free_guidance(lambda x, tt, c: unet.apply({"params": p["unet"]}, x, tt, *unet_inputs(c)),
                                   x_t, t, cond, p["uncond"], guidance_scale)
    return schedule.eps_to_x0(x_t, eps, t)
  return real_denoise


def vp_schedule(config) -> schedules.VPSchedule:
  schedule = schedules.from_config(config.schedule)
  if not isinstance(schedule, schedules.VPSchedule):
    raise ValueError(f"a Stable Diffusion teacher needs schedule.kind='vp', got {type(schedule).__name__}")
  return schedule


def check_schedule(schedule, scheduler_config, path):
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


def sd_teacher(config, unet_config: dict, vae_config: dict, unet_shapes, conditions, *, name: str = "sd",
               unet_inputs: Callable = text_only, cond_rows: int = 1) -> base.Teacher:
  """The ``Teacher`` of an SD pipeline, built from modules only (no I/O): what ``build`` returns once the
  converted pipeline and the prompts are at hand (``bench/sd_memory.py`` calls it on abstract values).

  ``unet_config`` / ``vae_config``: the converted pipeline's ``config.json`` dicts (e.g. ``families.sd.convert.SD15_UNET``);
  the teacher UNet and the VAE that writes images run in float32, the trainable UNet (generator and fake score,
  rematerialised when ``model.remat``) and the VAE inside the regression loss in ``model.dtype``.
  ``unet_shapes``: the UNet's parameters or their shapes (only the shapes are kept: ``init`` copies the UNet
  from the frozen parameters it is given, ``frozen['teacher']['unet']``, so no closure holds a host copy).
  ``conditions``: a ``base.PromptConditions``. The frozen parameters these functions take are
  :func:`sd_frozen`'s. SDXL (``families/sdxl/teacher.py``) passes ``unet_inputs`` (a condition → the UNet's
  conditioning arguments), the fewest rows of a condition ``cond_rows`` and its ``name``.
  """
  schedule = vp_schedule(config)
  unet_shapes = base.abstract(unet_shapes)
  dtype, attention = base.model_dtype(config), config.model.attention
  teacher = sdc.build_unet(unet_config, attention=attention)[0]
  student = sdc.build_unet(unet_config, dtype=dtype, remat=bool(config.model.remat), attention=attention)[0]
  vae_out = sdc.build_vae(vae_config, attention=attention)[0]                 # float32: the images written out
  vae_train = sdc.build_vae(vae_config, dtype=dtype, attention=attention)[0]  # model dtype: in the regression loss
  scaling = float(vae_config.get("scaling_factor", 0.18215))
  res = int(config.model.get("latent_resolution", 0) or unet_config.get("sample_size", 64))
  ch = int(teacher.config.in_channels)
  g = float(config.guidance_scale)
  t_gen = int(config.generator.timestep)
  if not 0 <= t_gen < schedule.num_timesteps:
    raise ValueError(f"generator.timestep must be in [0, {schedule.num_timesteps}), got {t_gen}")

  def eps_of(module, params):
    return lambda x, t, c: module.apply({"params": params}, x, t, *unet_inputs(c))

  def generate(params, z, cond):
    t = jnp.full((z.shape[0],), t_gen, jnp.int32)
    return schedule.eps_to_x0(z, eps_of(student, params)(z, t, cond), t)

  def fake_denoise(p, x_t, t, cond):
    return schedule.eps_to_x0(x_t, eps_of(student, p)(x_t, t, cond), t)

  def features(p, x_t, t, cond):   # the mid-block output (DMD2's GAN head input, docs/method.md §7)
    return student.apply({"params": p}, x_t, t, *unet_inputs(cond),
                         return_mid_features=True)[1].astype(jnp.float32)

  def feature_shape():
    cond = jax.ShapeDtypeStruct((1, cond_rows, int(teacher.config.cross_attention_dim[0])), jnp.float32)
    return jax.eval_shape(features, unet_shapes, jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32), cond).shape[1:]

  sampler = config.regression.get("sampler", "pndm")
  if sampler not in ("pndm", "ddim"):
    raise ValueError(f"regression.sampler must be 'pndm' or 'ddim' for a Stable Diffusion teacher, got "
                     f"{sampler!r}")
  steps = int(config.regression.sampler_steps)
  sample_fn = pndm_sample if sampler == "pndm" else ddim_sample

  def teacher_sample(p, z, cond):
    return sample_fn(eps_of(teacher, p["unet"]), z, cond, p["uncond"], num_steps=steps, guidance_scale=g,
                     alphas_cumprod=schedule.alphas_cumprod)

  def decode_with(module):
    return lambda vae_p, x: module.apply({"params": vae_p}, x / scaling, method="decode")

  decode_train, decode_out = decode_with(vae_train), decode_with(vae_out)
  encode_out = lambda vae_p, images: vae_out.apply({"params": vae_p}, images.astype(jnp.float32), method="encode")
  distance = base.distance(config)
  if config.regression.distance == "lpips":
    def regression_distance(frozen, x, y):   # LPIPS between decoded images (docs/method.md §5)
      return distance(frozen["lpips"], decode_train(frozen["vae"], x),
                      decode_train(frozen["vae"], jax.lax.stop_gradient(y)))
  else:                                      # 'l2' / 'mse' on the latents
    regression_distance = lambda frozen, x, y: distance(None, x, y)

  nfe = (steps + 1 if sampler == "pndm" else steps) * (1 if g == 1.0 else 2)
  return base.Teacher(
      name=name,
      schedule=schedule,
      generate=generate,
      generate_at=fake_denoise,     # the same UNet as a denoiser at t, with the generator's parameters
      real_denoise=real_denoiser(teacher, schedule, g, unet_inputs),
      fake_denoise=fake_denoise,
      sample_noise=lambda rng, n: jax.random.normal(rng, (n, res, res, ch), jnp.float32),
      init=base.teacher_copies(lambda frozen: frozen["teacher"]["unet"]),
      conditions=conditions,
      sampler=base.TeacherSampler(sample=teacher_sample, nfe=nfe,
                                  spec={"sampler": sampler, "sampler_steps": steps, "guidance_scale": g}),
      regression_distance=regression_distance,
      decode=lambda frozen, x: decode_out(frozen["vae"], x),
      encode=lambda frozen, images: scaling * encode_out(frozen["vae"], images),
      critic=base.conv_critic(features, feature_shape),
      images=True,
      sample_shape=(res, res, ch),
      lora=lora.Base(params=lambda frozen: frozen["teacher"]["unet"],
                     module_name=lambda path: sdc.torch_key("/".join(path)).rsplit(".", 1)[0],
                     default_targets=LORA_TARGETS),
  )


def sd_frozen(unet_params, uncond, vae_params, lpips_params) -> dict:
  """The frozen parameters of an SD teacher: the teacher UNet and the empty prompt's embedding ``uncond``
  [1, L, D] (the real score's guidance), the VAE (regression distance and outputs) and LPIPS (``{}`` for
  'l2' / 'mse')."""
  return {"teacher": {"unet": unet_params, "uncond": uncond}, "vae": vae_params, "lpips": lpips_params}


def teacher_dir(config, workdir: str | None) -> str:
  """The folder written by ``python -m dmd_jax.convert sd``; ``teacher.path='random'`` writes a tiny
  random-weight pipeline under the workdir and converts it."""
  return pretrained.network_dir(config.teacher.path, "teacher.path", "sd", workdir,
                                lambda dst: sdc.write_random_converted(dst, seed=config.seed),
                                marker="text_encoder/config.json")


def build(config, workdir: str | None) -> tuple[base.Teacher, dict]:
  """Reads the converted pipeline (``teacher.path``), the LPIPS weights and the prompts, then
  :func:`sd_teacher`."""
  path = teacher_dir(config, workdir)
  teacher_sd = sdc.load_converted_sd(path, attention=config.model.attention)
  check_schedule(vp_schedule(config), teacher_sd["scheduler_config"], path)
  unet, unet_params = teacher_sd["unet"]
  text_module, text_params = teacher_sd["text_encoder"]
  if text_module.config.hidden_size != unet.config.cross_attention_dim[0]:
    raise ValueError(f"{path}: the text encoder's width {text_module.config.hidden_size} is not the UNet's "
                     f"cross_attention_dim {unet.config.cross_attention_dim[0]}")
  encoder = TextEncoder(text_module, text_params, teacher_sd["tokenizer"], config.data.embedding_batch_size)
  encoder_id = path if "://" in path else os.path.abspath(path)
  prompts = PromptSet(prompts_from_config(config.data), encoder, workdir, encoder_id, config.data.embedding_dtype)
  conditions = base.PromptConditions(prompts, config.seed, encode_text=encoder)
  teacher = sd_teacher(config, teacher_sd["configs"]["unet"], teacher_sd["configs"]["vae"],
                       unet_params, conditions)   # sd_teacher keeps only their shapes
  uncond = encoder([""])                                  # [1, L, D]: the empty prompt (guidance)
  return teacher, sd_frozen(unet_params, uncond, teacher_sd["vae"][1], base.distance_params(config, workdir))


class AbstractPrompts:
  """A prompt set of ``n`` prompts known by the shape of its embedding table only (``[n, L, D]``), standing in
  for ``data.prompts.PromptSet`` where nothing is embedded (compile-only plans: the training step takes the
  conditions from its batch)."""
  key = "abstract"

  def __init__(self, n: int, length: int, width: int):
    self.table = jax.ShapeDtypeStruct((n, length, width), jnp.float32)

  def __len__(self):
    return self.table.shape[0]

  def lookup(self, ids):
    raise NotImplementedError("an abstract prompt set has no embeddings")

  eval_table = lookup


def network_configs(config) -> dict:
  """The ``config.json`` dicts of the UNet, VAE and text encoder: the converted folder's (``teacher.path``),
  the tiny random pipeline's (``'random'``), or SD 1.5's (no path: the network ``configs/coco.py`` names)."""
  path = config.teacher.path
  if path == "random":
    return {"unet": sdc.TINY_UNET, "vae": sdc.TINY_VAE, "text_encoder": sdc.TINY_CLIP}
  if not path:
    return {"unet": sdc.SD15_UNET, "vae": sdc.SD15_VAE, "text_encoder": sdc.SD15_TEXT}
  return {name: io.read_json(io.join(path, name, "config.json")) for name in sdc.NETWORKS}


def abstract(config) -> tuple[base.Teacher, dict]:
  """The SD teacher from the networks' configs alone (:func:`network_configs`), frozen parameters as shapes
  (``families.abstract``)."""
  cfgs = network_configs(config)
  shapes = lambda module, inputs: jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
  unet_params, vae_params = shapes(*sdc.build_unet(cfgs["unet"])), shapes(*sdc.build_vae(cfgs["vae"]))
  text = cfgs["text_encoder"]
  length, width = int(text["max_position_embeddings"]), int(text["hidden_size"])
  n = len(config.data.prompts) or int(config.data.num_prompts) or 1
  conditions = base.PromptConditions(AbstractPrompts(n, length, width), config.seed, encode_text=None)
  frozen = sd_frozen(unet_params, jax.ShapeDtypeStruct((1, length, width), jnp.float32), vae_params,
                     base.abstract_distance_params(config))
  return sd_teacher(config, cfgs["unet"], cfgs["vae"], unet_params, conditions), frozen
