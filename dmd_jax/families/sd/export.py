"""A Stable Diffusion run's generator for diffusers (``python -m dmd_jax.export``, docs/export.md): ``unet/``
(``diffusion_pytorch_model.safetensors`` + the teacher UNet's ``config.json``); with ``--teacher_src`` (the
teacher's original diffusers pipeline folder) also its ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (``feature_extractor/``, ``safety_checker/`` when present) and a ``model_index.json``: a whole
``StableDiffusionPipeline`` folder. A LoRA run also gets its adapters alone, ``lora/``, for diffusers'
``load_lora_weights``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dmd_jax import dmd, export_lib, io, lora
from dmd_jax.families.sd import convert as sd_convert
from dmd_jax.families.sd import teacher as sd_teacher

SD_PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")   # copied from --teacher_src (required)
SD_OPTIONAL_PARTS = ("feature_extractor", "safety_checker")             # copied when present


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """What differs between the diffusers pipelines this module exports for (SD here, SDXL in
  ``families/sdxl/export.py``): the pipeline class, the parts copied from ``--teacher_src`` (required and
  optional), the converted teacher's folder (``teacher_dir(config, workdir)``) and how the UNet is conditioned."""
  class_name: str
  parts: tuple
  optional_parts: tuple
  teacher_dir: Callable
  conditioning: str
  unet_inputs: str = "encoder_hidden_states=text_embeddings"   # the UNet call's conditioning arguments


SD = Pipeline(
    class_name="StableDiffusionPipeline", parts=SD_PIPELINE_PARTS, optional_parts=SD_OPTIONAL_PARTS,
    teacher_dir=sd_teacher.teacher_dir,
    conditioning=("encoder_hidden_states: the teacher's CLIP text encoder's last hidden state [B, L, D] for the "
                  "prompt, tokenized to the tokenizer's model_max_length (padded)"))


def check_teacher_src(teacher_src: str, pipeline: Pipeline = SD) -> None:
  """``--teacher_src`` must be a local diffusers pipeline folder of ``pipeline``'s kind (checked before anything
  is read)."""
  if io.is_remote(teacher_src):
    raise ValueError(f"--teacher_src={teacher_src}: a local diffusers pipeline folder is needed")
  missing = [p for p in pipeline.parts if not os.path.isdir(os.path.join(teacher_src, p))]
  if missing:
    raise FileNotFoundError(f"--teacher_src={teacher_src} is not a diffusers {pipeline.class_name} folder: no "
                            f"{', '.join(m + '/' for m in missing)}")


def _sd_timesteps(config) -> list[int]:
  """The generator's timesteps: its own at pure noise, then its later ones."""
  steps = dmd.generator_steps(config.generator.get("steps", ()), config.schedule.num_timesteps)
  return [int(config.generator.timestep)] + [int(t) for t in steps[1:]]


def write(out_dir: str, run, params, teacher_src: str | None = None, pipeline: Pipeline = SD) -> dict:
  """``unet/`` (diffusers ``UNet2DConditionModel``: safetensors + the teacher UNet's config.json); with
  ``teacher_src`` the rest of the teacher's pipeline and a ``model_index.json``."""
  config = run.config
  schedule = sd_teacher.vp_schedule(config)
  teacher = pipeline.teacher_dir(config, run.workdir)
  unet_config = dict(io.read_json(io.join(teacher, "unet", "config.json")))
  unet_config.setdefault("_class_name", "UNet2DConditionModel")
  vae_config = io.read_json(io.join(teacher, "vae", "config.json"))
  state_dict = sd_convert.to_torch_state_dict(params)
  unet_dir = os.path.join(out_dir, "unet")
  os.makedirs(unet_dir)
  weights = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
  export_lib.save_safetensors(weights, state_dict)
  export_lib.wrote(weights, out_dir)
  export_lib.write_json(os.path.join(unet_dir, "config.json"), unet_config)
  export_lib.wrote(os.path.join(unet_dir, "config.json"), out_dir)
  copied = teacher_src is not None
  if copied:
    _copy_pipeline(teacher_src, out_dir, unet_config, schedule, pipeline)

  timesteps = _sd_timesteps(config)
  abar = schedule.alphas_cumprod
  res, _, ch = run.teacher.sample_shape
  return {
      "files": {"unet": "unet/ (diffusers UNet2DConditionModel: diffusion_pytorch_model.safetensors, config.json)",
                **({"pipeline": f"model_index.json + unet/ {' '.join(p + '/' for p in pipeline.parts)} "
                                f"(a diffusers {pipeline.class_name} folder)"} if copied else {})},
      "network": "diffusers.UNet2DConditionModel",
      "prediction_type": "epsilon",
      "timesteps": timesteps,
      "num_steps": len(timesteps),
      "input": "z ~ N(0, I) latents of latent_shape, fed as they are as x_t at timesteps[0] (no scaling)",
      "sampling": (f"x_t = z; for each j: eps = unet(x_t, timesteps[j], {pipeline.unet_inputs}).sample; "
                   "x0 = (x_t - sqrt(1 - alphas_cumprod[t]) eps) / sqrt(alphas_cumprod[t]); "
                   "if j is not the last step: x_t = sqrt(alphas_cumprod[t']) x0 + sqrt(1 - alphas_cumprod[t']) n "
                   "with t' = timesteps[j + 1] and fresh noise n ~ N(0, I). The output is the last x0"),
      "x0_from_epsilon": "x0 = (x_t - sqrt(1 - alphas_cumprod[t]) * eps) / sqrt(alphas_cumprod[t])",
      "schedule": {"beta_schedule": "scaled_linear", "beta_start": schedule.beta_start,
                   "beta_end": schedule.beta_end, "num_train_timesteps": schedule.num_timesteps,
                   "alphas_cumprod": ("cumprod(1 - betas), betas = linspace(sqrt(beta_start), sqrt(beta_end), "
                                      "num_train_timesteps) ** 2 (diffusers' scaled_linear)"),
                   "alphas_cumprod_at_timesteps": {str(t): float(abar[t]) for t in timesteps}},
      "guidance": "none",
      "guidance_scale": 1.0,
      "teacher_guidance_scale": float(config.guidance_scale),
      "guidance_note": ("classifier-free guidance is distilled into the generator: call the UNet once per "
                        "step with the prompt's embedding only (no unconditional branch)"),
      "conditioning": pipeline.conditioning,
      "latent_shape": [int(ch), int(res), int(res)],
      "latent_layout": "NCHW (diffusers); dmd_jax itself works in NHWC",
      "vae_scaling_factor": float(vae_config.get("scaling_factor", 0.18215)),
      "decode": "images = vae.decode(x0 / vae_scaling_factor).sample, in [-1, 1]",
      "dtype": "float32",
  }


def _config_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  """The non-private keys on which two diffusers config dicts differ (lists and tuples alike)."""
  norm = lambda v: json.loads(json.dumps(v))
  keys = {k for k in set(a) | set(b) if not k.startswith("_")}
  return sorted(k for k in keys if k in a and k in b and norm(a[k]) != norm(b[k]))


def _copy_pipeline(src: str, out_dir: str, unet_config: Mapping[str, Any], schedule, pipeline: Pipeline) -> None:
  """Copies the non-UNet parts of the diffusers pipeline folder ``src`` into ``out_dir`` and writes its
  ``model_index.json`` (the source's, with the exported UNet; parts not copied set to ``[null, null]``)."""
  src_unet = os.path.join(src, "unet", "config.json")
  if os.path.exists(src_unet):
    with open(src_unet) as f:
      differ = _config_differences(json.load(f), unet_config)
    if differ:
      raise ValueError(f"--teacher_src={src}: its unet/config.json differs from the run's teacher UNet on "
                       f"{', '.join(differ)}: not the pipeline this teacher was converted from")
  sched = os.path.join(src, "scheduler", "scheduler_config.json")
  if os.path.exists(sched):
    with open(sched) as f:
      sd_teacher.check_schedule(schedule, json.load(f), src)
  copied = []
  for part in pipeline.parts + pipeline.optional_parts:
    folder = os.path.join(src, part)
    if not os.path.isdir(folder):
      continue
    shutil.copytree(folder, os.path.join(out_dir, part))
    copied.append(part)
    print(f"copied {part}/ from {src} ({export_lib.human(export_lib.size(os.path.join(out_dir, part)))})", flush=True)
  index_path = os.path.join(src, "model_index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  else:
    index = _default_model_index(src, pipeline)
  index["_class_name"] = index.get("_class_name") or pipeline.class_name
  index["unet"] = ["diffusers", "UNet2DConditionModel"]
  for key, value in list(index.items()):
    if key.startswith("_") or key == "unet" or not isinstance(value, list) or len(value) != 2:
      continue
    if key not in copied and value != [None, None]:
      index[key] = [None, None]
  if "safety_checker" in pipeline.optional_parts and "safety_checker" not in copied:
    index["requires_safety_checker"] = False
  export_lib.write_json(os.path.join(out_dir, "model_index.json"), index)
  export_lib.wrote(os.path.join(out_dir, "model_index.json"), out_dir)


def _default_model_index(src: str, pipeline: Pipeline) -> dict:
  """A ``model_index.json`` for a pipeline folder that has none: the classes from the parts' own configs."""
  def class_of(part, file, default):
    path = os.path.join(src, part, file)
    if not os.path.exists(path):
      return default
    with open(path) as f:
      cfg = json.load(f)
    return cfg.get("_class_name") or (cfg.get("architectures") or [default])[0]
  known = {
      "vae": ["diffusers", class_of("vae", "config.json", "AutoencoderKL")],
      "text_encoder": ["transformers", class_of("text_encoder", "config.json", "CLIPTextModel")],
      "text_encoder_2": ["transformers", class_of("text_encoder_2", "config.json", "CLIPTextModelWithProjection")],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "tokenizer_2": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", class_of("scheduler", "scheduler_config.json", "PNDMScheduler")],
      "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
      "feature_extractor": ["transformers", "CLIPImageProcessor"],
  }
  return {"_class_name": pipeline.class_name,
          **{part: known[part] for part in pipeline.parts + pipeline.optional_parts}}


SD_LORA_FILE = "pytorch_lora_weights.safetensors"   # the file name diffusers' load_lora_weights looks for


def sd_lora_state_dict(plan, adapters, module_name) -> dict:
  """A LoRA generator's adapters as diffusers / PEFT LoRA weights of the UNet (``module_name``: the teacher's,
  ``Teacher.lora.module_name``): ``unet.<module>.lora_A.weight``
  and ``.lora_B.weight`` in PyTorch layout (a Linear's A ``[r, in]`` and B ``[out, r]``; a Conv2d's A a
  ``kh × kw`` convolution ``[r, in, kh, kw]``, B a 1 × 1 one ``[out, r, 1, 1]``). The scale ``alpha / rank`` is
  folded into B, so the loader's default ``lora_alpha = rank`` (scale 1) gives the trained network."""
  out = {}
  for path, shape in plan.modules:
    node = adapters
    for k in path:
      node = node[k]
    down = np.asarray(node[lora.DOWN], np.float32)
    up = np.asarray(node[lora.UP], np.float32) * plan.scale
    name = "unet." + module_name(path + ("kernel",))
    if len(shape) == 4:
      a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
    else:
      a, b = down.T, up.T
    out[name + ".lora_A.weight"] = np.ascontiguousarray(a)
    out[name + ".lora_B.weight"] = np.ascontiguousarray(b)
  return out


def write_lora(out_dir: str, run, gen_state, pipeline: Pipeline = SD) -> dict:
  """``lora/pytorch_lora_weights.safetensors``: the adapters (the EMA's when kept) for
  ``pipe.load_lora_weights(DIR/lora)`` on the teacher's own pipeline."""
  plan = run.lora["generator"]
  adapters = jax.device_get(gen_state.get("ema_params", gen_state["params"]))
  path = os.path.join(out_dir, "lora", SD_LORA_FILE)
  export_lib.save_safetensors(path, sd_lora_state_dict(plan, adapters, run.teacher.lora.module_name))
  export_lib.wrote(path, out_dir)
  return {"file": f"lora/{SD_LORA_FILE}", "rank": plan.rank, "alpha": plan.alpha,
          "scale_folded_into_lora_B": plan.scale, "targets": list(plan.targets), "num_modules": len(plan.modules),
          "num_params": plan.num_params(),
          "load": (f"pipe = {pipeline.class_name}.from_pretrained(TEACHER); pipe.load_lora_weights(DIR/lora) "
                   "(the adapters apply to the teacher's UNet; unet/ holds the same network merged)")}
