"""``python -m dmd_jax.export``: a distilled generator, out of its Orbax checkpoint, in its teacher's format.

    python -m dmd_jax.export --config=CONFIG --workdir=WORKDIR --dst=DIR [--step=N] [--overwrite]
        [--teacher_src=DIR]

``--config`` (and ``--config.a.b=value`` overrides) as for ``python -m dmd_jax.main``: the run's config. The
checkpoint of ``--step`` (default: the latest) in ``WORKDIR`` is restored and its generator (the EMA when the
run keeps one) written to ``DIR`` in the format of the teacher family (``config.model.family``):

* ``sd``: a diffusers ``unet/`` folder (``diffusion_pytorch_model.safetensors`` + the teacher UNet's
  ``config.json``); with ``--teacher_src`` (the teacher's original diffusers pipeline folder) also its
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` (``feature_extractor/``, ``safety_checker/``
  when present) and a ``model_index.json``: a whole ``StableDiffusionPipeline`` folder.
* ``edm``: ``generator.safetensors`` (EDMPrecond's state dict, EDM's names) + ``init_kwargs.json``, the two
  inputs of ``python -m dmd_jax.convert edm --src=DIR/generator.safetensors --init_kwargs=DIR/init_kwargs.json``.
* ``toy``: ``generator.npz`` (the flattened Flax parameters).

Every export also holds ``dmd_jax_generator.json``: how to call the network (timesteps or sigmas, the
parameterisation, shapes), the source run and step. docs/export.md describes each field.

The export is atomic: everything is written into a temporary sibling folder ``.<DIR name>.export-tmp-<pid>-...``,
which is renamed onto ``DIR`` once complete; a non-empty ``DIR`` is refused unless ``--overwrite``, and then
replaced only after the new export is complete (the old one is moved aside, the new one renamed in, the old
one deleted). A failed or killed export leaves ``DIR`` as it was. Destinations are local folders (copy the
result to a bucket afterwards); the workdir may be local or ``gs://``.

Bad input (a non-empty ``DIR``, no checkpoint, an unknown step, ...) is one ``error:`` line on stderr and exit
status 2, as in ``dmd_jax.main``.

Extending it (e.g. LoRA): :func:`generator_network_params` is the one place that turns a restored run into the
generator network's full float32 parameters, and each family's files are written by one function of
``WRITERS`` (``write_sd``, ``write_edm``, ``write_toy``: ``(out_dir, run, params, teacher_src) -> manifest
fields``) into the temporary folder; a further file (an adapter's safetensors) is one more call there.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import sys
import traceback
from typing import Any, Callable, Iterator, Mapping

from absl import app, flags
from ml_collections import config_flags

MANIFEST = "dmd_jax_generator.json"
FORMAT = "dmd_jax.export"
FORMAT_VERSION = 1
SD_PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")   # copied from --teacher_src (required)
SD_OPTIONAL_PARTS = ("feature_extractor", "safety_checker")             # copied when present
_STAGING = re.compile(r"^\.(?P<name>.+)\.export-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


# ---------------------------------------------------------------------------------------------------------
# The checkpoint and the generator's parameters.
# ---------------------------------------------------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps in ``workdir`` (ascending; [] when there is none or no such folder)."""
  from dmd_jax import checkpoint
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def choose_step(workdir: str, step: int | None = None) -> int:
  """``step`` checked against the checkpoints in ``workdir`` (default: the latest); ``FileNotFoundError``
  when there is none, ``ValueError`` listing the available steps when ``step`` is not one of them."""
  from dmd_jax import io
  steps = checkpoint_steps(workdir)
  if not steps:
    where = io.join(io.abspath(workdir), "checkpoints")
    raise FileNotFoundError(f"no checkpoint in {where}: train first (python -m dmd_jax.main, same --workdir)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"--step={step}: no such checkpoint in {workdir}; available steps: "
                     f"{', '.join(str(s) for s in steps)}")
  return step


def params_source(gen_state) -> str:
  """Which parameters of the generator state are exported: ``'ema_params'`` when the run keeps an EMA."""
  return "ema_params" if "ema_params" in gen_state else "params"


def generator_network_params(run, gen_state) -> dict:
  """The generator network's full parameters from a restored run, as a nested dict of float32 numpy arrays:
  what every family's writer exports. The sampling parameters (the EMA when there is one): ``run.generator_params``
  (it merges a LoRA generator's adapters onto the teacher's arrays)."""
  import jax
  import numpy as np
  params = jax.device_get(run.generator_params(gen_state))
  return jax.tree.map(lambda x: np.asarray(x, np.float32), _plain(params))


def _plain(tree):
  """Flax FrozenDicts / Mappings → plain dicts (leaves unchanged)."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def _num_params(params) -> int:
  import jax
  import numpy as np
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------------------------------------
# Files: sizes and progress.
# ---------------------------------------------------------------------------------------------------------

def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _human(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _wrote(path: str, root: str) -> None:
  print(f"wrote {os.path.relpath(path, root)} ({_human(_size(path))})", flush=True)


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.write("\n")


def _save_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """A float32 state dict as ``.safetensors`` (no pickles); ``metadata`` as the file's string metadata."""
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_file(dict(tensors), path, metadata={"format": "pt", **(metadata or {})})
  os.chmod(path, 0o644)   # safetensors creates its files owner-only; an export is meant to be shared


# ---------------------------------------------------------------------------------------------------------
# The families. Each writer gets the temporary output folder, the run, the float32 parameters and
# --teacher_src, writes its files there and returns its fields of dmd_jax_generator.json.
# ---------------------------------------------------------------------------------------------------------

def _sd_timesteps(config) -> list[int]:
  from dmd_jax import train
  steps = train.generator_steps(config)
  return [int(config.generator.timestep)] + [int(t) for t in steps[1:]]


def write_sd(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  """``unet/`` (diffusers ``UNet2DConditionModel``: safetensors + the teacher UNet's config.json); with
  ``teacher_src`` the rest of the teacher's pipeline and a ``model_index.json``."""
  from dmd_jax import io
  from dmd_jax.families.sd import convert as sd_convert
  from dmd_jax.families.sd import teacher as sd_teacher
  config = run.config
  schedule = sd_teacher.vp_schedule(config)
  teacher = sd_teacher.teacher_dir(config, run.workdir)
  unet_config = dict(io.read_json(io.join(teacher, "unet", "config.json")))
  unet_config.setdefault("_class_name", "UNet2DConditionModel")
  vae_config = io.read_json(io.join(teacher, "vae", "config.json"))
  state_dict = sd_convert.to_torch_state_dict(params)
  unet_dir = os.path.join(out_dir, "unet")
  os.makedirs(unet_dir)
  weights = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
  _save_safetensors(weights, state_dict)
  _wrote(weights, out_dir)
  _write_json(os.path.join(unet_dir, "config.json"), unet_config)
  _wrote(os.path.join(unet_dir, "config.json"), out_dir)
  pipeline = False
  if teacher_src is not None:
    _copy_sd_pipeline(teacher_src, out_dir, unet_config, schedule)
    pipeline = True

  timesteps = _sd_timesteps(config)
  abar = schedule.alphas_cumprod
  res, _, ch = run.teacher.sample_shape
  return {
      "files": {"unet": "unet/ (diffusers UNet2DConditionModel: diffusion_pytorch_model.safetensors, config.json)",
                **({"pipeline": "model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/ "
                                "(a diffusers StableDiffusionPipeline folder)"} if pipeline else {})},
      "network": "diffusers.UNet2DConditionModel",
      "prediction_type": "epsilon",
      "timesteps": timesteps,
      "num_steps": len(timesteps),
      "input": "z ~ N(0, I) latents of latent_shape, fed as they are as x_t at timesteps[0] (no scaling)",
      "sampling": ("x_t = z; for each j: eps = unet(x_t, timesteps[j], encoder_hidden_states=text_embeddings)"
                   ".sample; x0 = (x_t - sqrt(1 - alphas_cumprod[t]) eps) / sqrt(alphas_cumprod[t]); "
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
      "conditioning": ("encoder_hidden_states: the teacher's CLIP text encoder's last hidden state [B, L, D] "
                       "for the prompt, tokenized to the tokenizer's model_max_length (padded)"),
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


def _copy_sd_pipeline(src: str, out_dir: str, unet_config: Mapping[str, Any], schedule) -> None:
  """Copies the non-UNet parts of the diffusers pipeline folder ``src`` into ``out_dir`` and writes its
  ``model_index.json`` (the source's, with the exported UNet; parts not copied set to ``[null, null]``)."""
  from dmd_jax.families.sd import teacher as sd_teacher
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
  for part in SD_PIPELINE_PARTS + SD_OPTIONAL_PARTS:
    folder = os.path.join(src, part)
    if not os.path.isdir(folder):
      continue
    shutil.copytree(folder, os.path.join(out_dir, part))
    copied.append(part)
    print(f"copied {part}/ from {src} ({_human(_size(os.path.join(out_dir, part)))})", flush=True)
  index_path = os.path.join(src, "model_index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  else:
    index = _default_model_index(src)
  index["_class_name"] = index.get("_class_name") or "StableDiffusionPipeline"
  index["unet"] = ["diffusers", "UNet2DConditionModel"]
  for key, value in list(index.items()):
    if key.startswith("_") or key == "unet" or not isinstance(value, list) or len(value) != 2:
      continue
    if key not in copied and value != [None, None]:
      index[key] = [None, None]
  if "safety_checker" not in copied:
    index["requires_safety_checker"] = False
  _write_json(os.path.join(out_dir, "model_index.json"), index)
  _wrote(os.path.join(out_dir, "model_index.json"), out_dir)


def _default_model_index(src: str) -> dict:
  """A ``model_index.json`` for a pipeline folder that has none: the classes from the parts' own configs."""
  def class_of(part, file, default):
    path = os.path.join(src, part, file)
    if not os.path.exists(path):
      return default
    with open(path) as f:
      cfg = json.load(f)
    return cfg.get("_class_name") or (cfg.get("architectures") or [default])[0]
  return {
      "_class_name": "StableDiffusionPipeline",
      "vae": ["diffusers", class_of("vae", "config.json", "AutoencoderKL")],
      "text_encoder": ["transformers", class_of("text_encoder", "config.json", "CLIPTextModel")],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", class_of("scheduler", "scheduler_config.json", "PNDMScheduler")],
      "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
      "feature_extractor": ["transformers", "CLIPImageProcessor"],
  }


def _edm_sigmas(config) -> list[float]:
  from dmd_jax import schedules, train
  steps = train.generator_steps(config)
  table = schedules.from_config(config.schedule).sigmas
  return [float(config.generator.sigma)] + [float(table[t]) for t in steps[1:]]


def write_edm(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  """``generator.safetensors`` (EDMPrecond's state dict in EDM's names) + ``init_kwargs.json`` (the
  teacher's)."""
  from dmd_jax import io
  from dmd_jax.families.edm import convert as edm_convert
  from dmd_jax.families.edm import teacher as edm_teacher
  del teacher_src
  config = run.config
  teacher = edm_teacher.teacher_dir(config, run.workdir)
  init_kwargs = io.read_json(io.join(teacher, "config.json"))["init_kwargs"]
  state_dict = edm_convert.to_torch_state_dict(params, init_kwargs)
  weights = os.path.join(out_dir, "generator.safetensors")
  _save_safetensors(weights, state_dict)
  _wrote(weights, out_dir)
  _write_json(os.path.join(out_dir, "init_kwargs.json"), init_kwargs)
  _wrote(os.path.join(out_dir, "init_kwargs.json"), out_dir)
  module = edm_convert.edm_models.edm_module_from_kwargs(init_kwargs)
  sigmas = _edm_sigmas(config)
  steps = [int(t) for t in run.hyper.generator_steps] or None
  return {
      "files": {"weights": "generator.safetensors (EDMPrecond state dict, EDM's names, float32)",
                "init_kwargs": "init_kwargs.json (EDMPrecond(**init_kwargs))"},
      "network": f"EDMPrecond with {module.model_type} (NVlabs/edm training/networks.py)",
      "preconditioning": ("EDMPrecond: D(x; sigma, class_labels) = c_skip x + c_out F(c_in x, c_noise, labels) with "
                          "c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / "
                          "sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = "
                          "ln(sigma) / 4; D predicts x0"),
      "sigma_data": float(module.sigma_data),
      "sigmas": sigmas,
      "num_steps": len(sigmas),
      **({"karras_timesteps": steps} if steps else {}),
      "input": "z ~ N(0, I) of image_shape; the network's input is x = sigmas[0] * z",
      "sampling": ("x = sigmas[0] z; for each j: x0 = D(x; sigmas[j], class_labels); if j is not the last step: "
                   "x = x0 + sigmas[j + 1] n with fresh noise n ~ N(0, I). The output is the last x0"),
      "class_labels": (f"one-hot float [N, {module.label_dim}]" if module.label_dim else "none (unconditional)"),
      "label_dim": int(module.label_dim),
      "image_shape": [int(module.img_channels), int(module.img_resolution), int(module.img_resolution)],
      "image_layout": "NCHW (EDM); dmd_jax itself works in NHWC",
      "output_range": "[-1, 1]",
      "guidance": "none",
      "dtype": "float32",
      "convert_back": ("python -m dmd_jax.convert edm --src=generator.safetensors --init_kwargs=init_kwargs.json "
                       "--dst=DIR"),
  }


def write_toy(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  """``generator.npz``: the Flax parameters flattened with ``/``-joined keys; a multi-step generator's also
  holds what its later steps compute with besides the weights (the mixture of the analytic teacher, the fixed
  Fourier matrix and noise frequencies), so that the json's formula runs from the npz alone."""
  import numpy as np
  from dmd_jax.convert.common import flatten_params
  from dmd_jax.models import mlp
  del teacher_src
  config = run.config
  steps = [int(t) for t in run.hyper.generator_steps]
  dim = int(run.teacher.sample_shape[0])
  arrays = flatten_params(params)
  if len(steps) > 1:
    fs = config.fake_score
    arrays.update({
        "teacher/weights": np.asarray(config.toy.weights, np.float64) / np.sum(config.toy.weights),
        "teacher/means": np.asarray(config.toy.means, np.float64),
        "teacher/std": np.asarray(float(config.toy.std)),
        "refine/fourier_B": mlp.fourier_matrix(dim, int(fs.num_fourier), float(fs.fourier_scale), seed=1),
        "refine/noise_freqs": mlp.noise_frequencies(mlp.ToyDenoiserNet.noise_embed_dim)})
  path = os.path.join(out_dir, "generator.npz")
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  _wrote(path, out_dir)
  hidden = [int(h) for h in config.generator.hidden]

  def layers(prefix):
    return (f"an MLP: Dense layers {prefix}mlp/dense0..dense{len(hidden) - 1} of widths {hidden}, each followed by "
            f"SiLU, then {prefix}mlp/out to {dim}; a Dense computes y = x @ kernel + bias (kernel [in, out], Flax "
            "layout)")
  files = {"weights": "generator.npz (flattened Flax parameters, keys joined with '/')"}
  if len(steps) <= 1:
    return {"files": files, "network": "dmd_jax.models.mlp.ToyGenerator", "architecture": layers(""),
            "num_steps": 1, "input": f"z ~ N(0, I_{dim})", "sampling": "x = MLP(z)", "guidance": "none",
            "dtype": "float32"}
  from dmd_jax import schedules
  schedule = schedules.from_config(config.schedule)
  sigmas = [float(schedule.sigma_max)] + [float(schedule.sigmas[t]) for t in steps[1:]]
  return {"files": {"weights": files["weights"] + "; also teacher/{weights, means, std}, refine/fourier_B, "
                                                  "refine/noise_freqs"},
          "network": ("dmd_jax.models.mlp.ToyGenerator (the first step) and dmd_jax.models.mlp.ToyDenoiserNet "
                      "(the residual of the later steps) around the analytic mixture denoiser "
                      "(dmd_jax.families.toy.teacher.gaussian_mixture_denoiser)"),
          "architecture": {
              "first": layers("first/"),
              "refine": (layers("refine/") + "; fed concat(u, cos(2 pi u B), sin(2 pi u B), cos(c_noise f), "
                         "sin(c_noise f)) with B = refine/fourier_B, f = refine/noise_freqs"),
              "teacher": ("D(x, sigma) = sum_k r_k (m_k + std^2 / v (x - m_k)), v = std^2 + sigma^2, r = softmax_k("
                          "ln w_k - |x - m_k|^2 / (2 v)) with w, m, std = teacher/weights, teacher/means, "
                          "teacher/std")},
          "num_steps": len(steps), "karras_timesteps": steps, "sigmas": sigmas,
          "sigma_data": float(schedule.sigma_data),
          "input": f"z ~ N(0, I_{dim})",
          "sampling": ("x0 = first(z); then for each later step j: x_t = x0 + sigmas[j] n with fresh noise "
                       "n ~ N(0, I), x0 = D(x_t, sigmas[j]) + c_out refine(c_in x_t, c_noise) with "
                       "c_out = sigmas[j] sigma_data / sqrt(sigmas[j]^2 + sigma_data^2), "
                       "c_in = 1 / sqrt(sigmas[j]^2 + sigma_data^2), c_noise = ln(sigmas[j]) / 4"),
          "guidance": "none", "dtype": "float32"}


WRITERS: dict[str, Callable[..., dict]] = {"sd": write_sd, "edm": write_edm, "toy": write_toy}

SD_LORA_FILE = "pytorch_lora_weights.safetensors"   # the file name diffusers' load_lora_weights looks for


def sd_lora_state_dict(plan, adapters, module_name) -> dict:
  """A LoRA generator's adapters as diffusers / PEFT LoRA weights of the UNet (``module_name``: the teacher's,
  ``Teacher.lora.module_name``): ``unet.<module>.lora_A.weight``
  and ``.lora_B.weight`` in PyTorch layout (a Linear's A ``[r, in]`` and B ``[out, r]``; a Conv2d's A a
  ``kh × kw`` convolution ``[r, in, kh, kw]``, B a 1 × 1 one ``[out, r, 1, 1]``). The scale ``alpha / rank`` is
  folded into B, so the loader's default ``lora_alpha = rank`` (scale 1) gives the trained network."""
  import numpy as np
  from dmd_jax import lora
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


def write_sd_lora(out_dir: str, run, gen_state) -> dict:
  """``lora/pytorch_lora_weights.safetensors``: the adapters (the EMA's when kept) for
  ``pipe.load_lora_weights(DIR/lora)`` on the teacher's own pipeline."""
  import jax
  plan = run.lora["generator"]
  adapters = jax.device_get(gen_state.get("ema_params", gen_state["params"]))
  path = os.path.join(out_dir, "lora", SD_LORA_FILE)
  _save_safetensors(path, sd_lora_state_dict(plan, adapters, run.teacher.lora.module_name))
  _wrote(path, out_dir)
  return {"file": f"lora/{SD_LORA_FILE}", "rank": plan.rank, "alpha": plan.alpha,
          "scale_folded_into_lora_B": plan.scale, "targets": list(plan.targets), "num_modules": len(plan.modules),
          "num_params": plan.num_params(),
          "load": ("pipe = StableDiffusionPipeline.from_pretrained(TEACHER); pipe.load_lora_weights(DIR/lora) "
                   "(the adapters apply to the teacher's UNet; unet/ holds the same network merged)")}


# ---------------------------------------------------------------------------------------------------------
# The destination: checks, a temporary sibling folder, the swap.
# ---------------------------------------------------------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_destination(dst: str, overwrite: bool, keep: Mapping[str, str | None] | None = None) -> str:
  """``dst`` as an absolute local path, or ``ValueError``: a remote path, a file, a non-empty folder without
  ``overwrite``, or a folder holding one of ``keep`` (``{flag: path}``: the workdir, ...)."""
  from dmd_jax import io
  if not dst:
    raise ValueError("--dst is required (the export's folder)")
  if io.is_remote(dst):
    raise ValueError(f"--dst={dst}: exports are written to a local folder (atomically: a folder rename); "
                     "copy it to the bucket afterwards (e.g. gcloud storage cp -r DIR gs://...)")
  path = os.path.abspath(dst)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"--dst={dst} exists and is not a folder")
  for flag, other in (keep or {}).items():
    if other and not io.is_remote(other) and _inside(other, path):
      raise ValueError(f"--dst={dst} holds {flag}={other}: choose another destination")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ValueError(f"--dst={dst} is not empty: pass --overwrite to replace it (it is replaced only once the "
                     "new export is complete)")
  return path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale(dst: str) -> None:
  """Leftovers of killed exports to ``dst``: temporary folders are deleted; an old export moved aside just
  before the swap is put back when ``dst`` is missing (the kill came between the two renames)."""
  parent, name = os.path.split(dst)
  if not os.path.isdir(parent):
    return
  for entry in sorted(os.listdir(parent)):
    m = _STAGING.match(entry)
    if not m or m["name"] != name or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
      continue
    path = os.path.join(parent, entry)
    if m["kind"] == "old" and not os.path.lexists(dst):
      os.rename(path, dst)
      print(f"restored {dst} (an earlier export was stopped while replacing it)", flush=True)
    else:
      shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
  for d, _, files in os.walk(folder):
    for f in files:
      fd = os.open(os.path.join(d, f), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(dst: str) -> Iterator[str]:
  """Yields a new empty temporary folder next to ``dst`` (absolute, local) which replaces ``dst`` when the
  block ends without an exception, and is deleted otherwise (``dst`` untouched). An existing ``dst`` is
  moved aside, the new folder renamed in, then the old one deleted."""
  parent, name = os.path.split(dst)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(dst)
  stem = f".{name}.export-%s-{os.getpid()}-{secrets.token_hex(4)}"
  tmp = os.path.join(parent, stem % "tmp")
  os.mkdir(tmp)
  try:
    yield tmp
    _fsync_tree(tmp)
    if os.path.lexists(dst):
      old = os.path.join(parent, stem % "old")
      os.rename(dst, old)
      try:
        os.rename(tmp, dst)
      except BaseException:
        os.rename(old, dst)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The export.
# ---------------------------------------------------------------------------------------------------------

def export(config, workdir: str, dst: str, step: int | None = None, overwrite: bool = False,
           teacher_src: str | None = None, config_name: str | None = None,
           config_overrides: Mapping[str, Any] | None = None) -> dict:
  """Writes the generator of checkpoint ``step`` (default: the latest) of the run ``(config, workdir)`` to
  the local folder ``dst`` in its teacher family's format (module docstring); returns the manifest
  (``dmd_jax_generator.json``). ``config_name`` / ``config_overrides``: how the config was given, recorded
  in the manifest. Bad input is a ``ValueError`` / ``FileNotFoundError`` raised before anything is written."""
  from dmd_jax import io, train
  family = config.model.family
  if family not in WRITERS:
    raise ValueError(f"model.family={family!r} cannot be exported; expected one of {', '.join(WRITERS)}")
  if not workdir:
    raise ValueError("--workdir is required (the run's folder)")
  if teacher_src is not None:
    if family != "sd":
      raise ValueError(f"--teacher_src is for Stable Diffusion runs (model.family='sd'), not {family!r}")
    if io.is_remote(teacher_src):
      raise ValueError(f"--teacher_src={teacher_src}: a local diffusers pipeline folder is needed")
    missing = [p for p in SD_PIPELINE_PARTS if not os.path.isdir(os.path.join(teacher_src, p))]
    if missing:
      raise FileNotFoundError(f"--teacher_src={teacher_src} is not a diffusers Stable Diffusion folder: no "
                              f"{', '.join(m + '/' for m in missing)}")
  dst = check_destination(dst, overwrite, {"--workdir": workdir, "--teacher_src": teacher_src})
  if not io.is_remote(workdir) and not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such folder")
  step = choose_step(workdir, step)

  from dmd_jax import modes
  run = train.setup(config, workdir)
  gen_state, _ = modes.latest_generator(run, step)
  which = params_source(gen_state)
  params = generator_network_params(run, gen_state)
  print(f"read the generator ({which}, {_num_params(params):,} parameters) of step {step} from "
        f"{io.join(run.workdir, 'checkpoints', str(step))}", flush=True)
  manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": family}
  with staged_folder(dst) as tmp:
    manifest.update(WRITERS[family](tmp, run, params, teacher_src=teacher_src))
    if "generator" in run.lora:   # the exported network is the merged one; SD also gets the adapters alone
      manifest["lora"] = (write_sd_lora(tmp, run, gen_state) if family == "sd" else
                          {"rank": run.lora["generator"].rank, "note": "adapters merged into the exported weights"})
    manifest["source"] = {
        "workdir": run.workdir, "step": int(step), "parameters": which,
        "config": config_name, "config_overrides": _jsonable(dict(config_overrides or {})),
        "teacher_src": (os.path.abspath(teacher_src) if teacher_src else None),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_config": json.loads(config.to_json_best_effort()),
    }
    _write_json(os.path.join(tmp, MANIFEST), manifest)   # last: its presence marks a complete export
    _wrote(os.path.join(tmp, MANIFEST), tmp)
    total = _size(tmp)
  print(f"exported step {step} of {run.workdir} ({family}) to {dst} ({_human(total)})", flush=True)
  return manifest


def _jsonable(v):
  return json.loads(json.dumps(v, default=str))


def read_manifest(folder: str) -> dict:
  """The ``dmd_jax_generator.json`` of an export folder."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder} is not a dmd_jax export (no {MANIFEST})")
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# Command line (the conventions of dmd_jax.main).
# ---------------------------------------------------------------------------------------------------------

def _define_flags() -> dict:
  """The command line's flags, defined only when it runs (importing this module leaves absl's global flags
  alone: ``dmd_jax.main`` defines ``--config`` and ``--workdir`` too)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. "
                                                "configs/coco.py:tiny.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "The run's folder (its checkpoints/)."),
      "dst": flags.DEFINE_string("dst", None, "The export folder (local; empty or missing unless --overwrite)."),
      "step": flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest)."),
      "overwrite": flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst (once the new export is "
                                     "complete)."),
      "teacher_src": flags.DEFINE_string("teacher_src", None, "Stable Diffusion: the teacher's original diffusers "
                                         "pipeline folder; its other parts are copied so that --dst is a whole "
                                         "pipeline."),
  }


def main(argv, f: Mapping[str, Any]):
  from dmd_jax.writers import quiet_library_logs
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "dst"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  flag = flags.FLAGS["config"]
  export(f["config"].value, f["workdir"].value, f["dst"].value, step=f["step"].value,
         overwrite=f["overwrite"].value, teacher_src=f["teacher_src"].value,
         config_name=config_flags.get_config_filename(flag),
         config_overrides=config_flags.get_override_values(flag))


def _exit(code: int, message: str | None = None, trace: bool = False) -> None:
  if trace:
    traceback.print_exc()
  if message:
    print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run():
  defined = _define_flags()
  flags.mark_flag_as_required("config")
  try:
    app.run(lambda argv: main(argv, defined))
  except (ValueError, FileNotFoundError) as e:   # bad input: one clear line, no traceback
    _exit(2, str(e))
  except KeyboardInterrupt:
    _exit(130, "interrupted (SIGINT)")


if __name__ == "__main__":
  run()
