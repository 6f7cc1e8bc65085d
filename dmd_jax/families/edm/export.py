"""An EDM run's generator in EDM's own format (``python -m dmd_jax.export``, docs/export.md):
``generator.safetensors`` (EDMPrecond's state dict, EDM's names) + ``init_kwargs.json``, the two inputs of
``python -m dmd_jax.convert edm --src=DIR/generator.safetensors --init_kwargs=DIR/init_kwargs.json``.
"""
from __future__ import annotations

import os

from dmd_jax import dmd, export_lib, io, schedules
from dmd_jax.families.edm import convert as edm_convert
from dmd_jax.families.edm import teacher as edm_teacher


def _edm_sigmas(config) -> list[float]:
  """The generator's sigmas: its own at pure noise, then the schedule's at its later timesteps."""
  steps = dmd.generator_steps(config.generator.get("steps", ()), config.schedule.num_timesteps)
  table = schedules.from_config(config.schedule).sigmas
  return [float(config.generator.sigma)] + [float(table[t]) for t in steps[1:]]


def write(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  """``generator.safetensors`` (EDMPrecond's state dict in EDM's names) + ``init_kwargs.json`` (the
  teacher's)."""
  del teacher_src
  config = run.config
  teacher = edm_teacher.teacher_dir(config, run.workdir)
  init_kwargs = io.read_json(io.join(teacher, "config.json"))["init_kwargs"]
  state_dict = edm_convert.to_torch_state_dict(params, init_kwargs)
  weights = os.path.join(out_dir, "generator.safetensors")
  export_lib.save_safetensors(weights, state_dict)
  export_lib.wrote(weights, out_dir)
  export_lib.write_json(os.path.join(out_dir, "init_kwargs.json"), init_kwargs)
  export_lib.wrote(os.path.join(out_dir, "init_kwargs.json"), out_dir)
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
