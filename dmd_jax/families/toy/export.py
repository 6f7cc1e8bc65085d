"""The toy run's generator as ``generator.npz``, the flattened Flax parameters (``python -m dmd_jax.export``,
docs/export.md).
"""
from __future__ import annotations

import os

import numpy as np

from dmd_jax import export_lib, schedules
from dmd_jax.convert.common import flatten_params
from dmd_jax.models import mlp


def write(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  """``generator.npz``: the Flax parameters flattened with ``/``-joined keys; a multi-step generator's also
  holds what its later steps compute with besides the weights (the mixture of the analytic teacher, the fixed
  Fourier matrix and noise frequencies), so that the json's formula runs from the npz alone."""
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
  export_lib.wrote(path, out_dir)
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
