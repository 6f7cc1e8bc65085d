"""The EDM family's config builder (``configs/cifar10.py``, ``configs/imagenet64.py``, ``configs/digits.py``)."""
from __future__ import annotations

import json

import ml_collections

from dmd_jax.config_lib import base_config, lora_config


def edm_config(*, lr: float, batch_size: int, num_train_steps: int, regression_weight: float, num_pairs: int,
               sampler_steps: int, architecture: dict | None = None) -> ml_collections.ConfigDict:
  """An EDM-teacher DMD config (docs/method.md §2–6) with the recipe's numbers; the config file adds its
  evaluators (``config.evals``) and its ``:tiny`` sizes. ``architecture``: the init_kwargs of the published
  checkpoint the config is for (compile-only plans before any conversion, ``python -m dmd_jax.plan``)."""
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(
      family="edm",
      dtype="bfloat16",     # activations; parameters, optimizer state and DM-loss arithmetic stay float32
      remat=False,
      # 'auto' (GPU: cuDNN flash for bf16; TPU: splash for long self-attention; else XLA), 'xla', 'cudnn',
      # 'splash' (docs/attention.md)
      attention="auto",
      lora=lora_config()))
  c.teacher = ml_collections.ConfigDict(dict(
      path="",              # a folder written by `python -m dmd_jax.convert edm`; 'random' for the :tiny variants
      random_init_kwargs="",   # JSON init_kwargs of the random-weight teacher (teacher.path='random')
      # JSON init_kwargs of the published checkpoint the config is for: what `python -m dmd_jax.plan` compiles
      # while teacher.path is empty (no weights needed)
      architecture=json.dumps(architecture) if architecture else ""))
  c.generator = ml_collections.ConfigDict(dict(
      sigma=80.0,           # G(z, c) = D(80 z; sigma = 80, c)
      steps=()))            # DMD2 multi-step: Karras-table timesteps t_0 = 999 > t_1 > ... (sigma = table[t])
  c.optim.lr = lr
  c.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.checkpoint_every = 5_000
  c.log_every = 100
  c.regression = ml_collections.ConfigDict(dict(
      weight=regression_weight,
      distance="lpips",     # LPIPS-VGG after bilinear upsampling to 224 (docs/method.md §5); or 'l2' / 'mse'
      lpips_path="",        # a folder written by `python -m dmd_jax.convert lpips --src=vgg16.pth`
      lpips_resize=224,
      num_pairs=num_pairs,
      shard_size=1_000,
      batch_size=batch_size,
      sampler_steps=sampler_steps))   # EDM Heun steps of the teacher ODE pairs (2N - 1 NFE)
  return c


def random_teacher(c, init_kwargs: dict) -> ml_collections.ConfigDict:
  """A random-weight teacher of ``init_kwargs`` written under the workdir (``:tiny``), with a random LPIPS at
  32 px and a random FID Inception against the teacher's own samples."""
  c.teacher.path = "random"
  c.teacher.random_init_kwargs = json.dumps(init_kwargs)
  c.regression.update(lpips_path="random", lpips_resize=32)
  if "fid" in c.get("evals", {}):
    c.evals.fid.update(inception_path="random", reference_stats="teacher")
  return c
