"""The EDM family's config builder (``configs/cifar10.py``, ``configs/imagenet64.py``, ``configs/digits.py``)."""
from __future__ import annotations

import json

import ml_collections

from dmd_jax.config_lib import base_config, lora_config


def edm_config(*, lr: float, batch_size: int, num_train_steps: int, regression_weight: float, num_pairs: int,
               sampler_steps: int, tiny_init_kwargs: dict | None,
               architecture: dict | None = None) -> ml_collections.ConfigDict:
  """An EDM-teacher DMD config (docs/method.md §2–6). ``tiny_init_kwargs`` switches to a small random-weight
  teacher of the same family, written under the workdir, with CPU-sized batches and step counts.
  ``architecture``: the init_kwargs of the published checkpoint the config is for (compile-only plans before
  any conversion, ``python -m dmd_jax.plan``)."""
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
  # docs/method.md §8: 50k samples, TF-FID protocol, EDM's reference statistics
  c.eval = ml_collections.ConfigDict(dict(
      evaluators=("grid", "fid"),   # evaluation/evaluators.py: sample picture, FID (with eval.inception_path)
      num_samples=50_000,
      batch_size=500,       # images per generation / Inception step (global)
      inception_path="",    # a folder written by `python -m dmd_jax.convert inception --src=pt_inception-...pth`
      reference_stats="",   # .npz with mu, sigma (EDM fid-refs); 'teacher' = stats of the teacher's own samples
      protocol="tf1",       # 'tf1' (EDM / DMD numbers) or 'pytorch_fid'
      every_steps=0,        # > 0: a monitoring FID on periodic_num_samples every this many steps
      periodic_num_samples=5_000))
  if tiny_init_kwargs is not None:
    c.teacher.path = "random"
    c.teacher.random_init_kwargs = json.dumps(tiny_init_kwargs)
    c.regression.lpips_path = "random"
    c.regression.lpips_resize = 32
    c.eval.num_samples = 16
    c.eval.batch_size = 8
    c.eval.inception_path = "random"
    c.eval.reference_stats = "teacher"
    c.eval.periodic_num_samples = 8
    c.model.dtype = "float32"
    c.batch_size = 8
    c.num_train_steps = 6
    c.checkpoint_every = 3
    c.log_every = 2
    c.regression.num_pairs = 24
    c.regression.shard_size = 8
    c.regression.batch_size = 8
    c.regression.sampler_steps = 4
    c.optim.warmup_steps = 2
  return c
