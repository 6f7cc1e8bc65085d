"""Shared builders of the ``configs/*.py`` files (each config file stays a readable list of a paper's numbers)."""
from __future__ import annotations

import json

import ml_collections


def parse_variants(arg: str, allowed: set[str]) -> set[str]:
  """``'uncond,tiny'`` → ``{'uncond', 'tiny'}``; unknown names are errors that list the allowed ones."""
  names = {a for a in (arg or "").replace("+", ",").split(",") if a}
  unknown = names - allowed
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; expected a comma-separated subset of "
                     f"{sorted(allowed)}")
  return names


def base_config(seed: int = 0) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.distributed = "auto"              # 'auto' (from the environment), 'yes', 'no': jax.distributed
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2 ** 18))
  c.ema = ml_collections.ConfigDict(dict(decay=0.0))   # the official code keeps no EMA
  c.dmd = ml_collections.ConfigDict(dict(dm_weight=1.0, fake_updates_per_generator_update=1))
  c.schedule = ml_collections.ConfigDict(dict(
      kind="edm", sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
      num_timesteps=1000, dm_t_min=20, dm_t_max=980))
  # method.md §6: AdamW (0.9, 0.999), wd 0.01, eps 1e-8, 500 warm-up steps then constant, clipping at 10
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-5, warmup_steps=500, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0,
      decay="constant"))
  return c


def edm_config(*, lr: float, batch_size: int, num_train_steps: int, regression_weight: float, num_pairs: int,
               sampler_steps: int, tiny_init_kwargs: dict | None) -> ml_collections.ConfigDict:
  """An EDM-teacher DMD config (method.md §2–6). ``tiny_init_kwargs`` switches to a small random-weight
  teacher of the same family, written under the workdir, with CPU-sized batches and step counts."""
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(
      family="edm",
      dtype="bfloat16",     # activations; parameters, optimizer state and DM-loss arithmetic stay float32
      remat=False))
  c.teacher = ml_collections.ConfigDict(dict(
      path="",              # a folder written by `python -m dmd_jax.convert edm`; 'random' for the :tiny variants
      random_init_kwargs=""))   # JSON init_kwargs of the random-weight teacher (teacher.path='random')
  c.generator = ml_collections.ConfigDict(dict(sigma=80.0))   # G(z, c) = D(80 z; sigma = 80, c)
  c.optim.lr = lr
  c.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.checkpoint_every = 5_000
  c.log_every = 100
  c.regression = ml_collections.ConfigDict(dict(
      weight=regression_weight,
      distance="lpips",     # LPIPS-VGG after bilinear upsampling to 224 (method.md §5); or 'l2' / 'mse'
      lpips_path="",        # a folder written by `python -m dmd_jax.convert lpips --src=vgg16.pth`
      lpips_resize=224,
      num_pairs=num_pairs,
      shard_size=1_000,
      batch_size=batch_size,
      sampler_steps=sampler_steps))   # EDM Heun steps of the teacher ODE pairs (2N - 1 NFE)
  # method.md §8: 50k samples, TF-FID protocol, EDM's reference statistics
  c.eval = ml_collections.ConfigDict(dict(
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
