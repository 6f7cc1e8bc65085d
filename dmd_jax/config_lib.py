"""Shared builders of the ``configs/*.py`` files (each config file stays a readable list of a paper's numbers);
a teacher family's own builder is its ``dmd_jax/families/<family>/config.py``."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """``get_config(variant)`` of ``configs/<name>.py`` (a path to another config file also works)."""
  path = name if name.endswith(".py") else os.path.join(CONFIGS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"dmd_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


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
  c.compilation_cache = "auto"        # 'auto' = <workdir>/compilation_cache, a path (gs:// too), '' = off
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2 ** 18))
  c.ema = ml_collections.ConfigDict(dict(decay=0.0))   # the official code keeps no EMA
  c.dmd = ml_collections.ConfigDict(dict(dm_weight=1.0, fake_updates_per_generator_update=1))
  c.schedule = ml_collections.ConfigDict(dict(
      kind="edm", sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
      num_timesteps=1000, dm_t_min=20, dm_t_max=980))
  # docs/method.md §6: AdamW (0.9, 0.999), wd 0.01, eps 1e-8, 500 warm-up steps then constant, clipping at 10
  c.optim = optim_config(lr=5e-5)
  c.gan = gan_config()
  c.init_from = init_from_config()
  return c


def optim_config(lr: float, warmup_steps: int = 500, **kw) -> ml_collections.ConfigDict:
  """AdamW with a linear warm-up, on one iteration clock for both networks (``dmd.learning_rate_schedule``)."""
  o = dict(
      lr=lr,
      warmup_steps=warmup_steps,   # the official --warmup_step (diffusers' constant_with_warmup)
      # the official run's process count: accelerate steps its scheduler once per process and iteration, so
      # the warm-up lasts warmup_steps / warmup_processes iterations (DMD2 ImageNet-64: 500 / 7 GPUs)
      warmup_processes=1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=10.0,
      decay="constant",            # or 'cosine' (to 0 at num_train_steps)
      max_consecutive_skips=10)    # steps with non-finite gradients are skipped; this many in a row stop the run
  o.update(kw)
  return ml_collections.ConfigDict(o)


def init_from_config() -> ml_collections.ConfigDict:
  """Start a run from another run's networks (the official ``--ckpt_only_path``; ``train.init_from_run``): used
  only while this workdir has no checkpoint of its own, so the new run resumes itself afterwards."""
  return ml_collections.ConfigDict(dict(
      workdir="",   # the other run's workdir ('' = start from the teacher)
      step=0))      # its checkpoint (0 = the latest)


def lora_config() -> ml_collections.ConfigDict:
  """LoRA on the generator (docs/lora.md), off (rank 0) until a ``:lora`` variant or an override sets it."""
  return ml_collections.ConfigDict(dict(
      rank=0,               # > 0: the generator trains rank-`rank` adapters on the teacher's own (frozen) arrays
      alpha=8.0,            # adapter scale alpha / rank
      targets=(),           # module names (the family's PyTorch naming); () = the family's defaults (the official
                            # DMD2 SDXL LoRA run's targets for SD: families/sd/teacher.py LORA_TARGETS)
      fake_score=False))    # the fake score trains adapters too (same targets) instead of a full copy


def lora(c, rank: int = 64, alpha: float = 8.0) -> ml_collections.ConfigDict:
  """The official DMD2 SDXL LoRA run's adapters: rank 64, alpha 8 on the family's default targets."""
  c.model.lora.rank = rank
  c.model.lora.alpha = alpha
  return c


def gan_config(**real_data) -> ml_collections.ConfigDict:
  """DMD2's GAN terms (docs/method.md §7), off (weights 0) until a ``:dmd2`` variant sets them. ``real_data``
  says where the critic's real samples come from (``dmd_jax/data/real.py``)."""
  rd = dict(
      source="",            # 'mixture' (toy), 'tfds' (pixel teachers: images + labels), 'coco_latents' (SD),
                            # 'digits' (configs/digits.py)
      dataset="",           # tfds name: 'cifar10', 'imagenet_resized/64x64', 'coco_captions'
      split="train",
      data_dir="",          # tfds data_dir of the prepared dataset ('' = tfds's default)
      image_size=0,         # SD: pixel size of the centre-cropped real images (0 = the teacher's decoded size,
                            #     8 × the latent size for SD 1.5: 512)
      num_images=0,         # SD: how many real images are VAE-encoded once (the first N of the split)
      shard_size=1_000,     # SD: rows per stored latent shard
      encode_batch_size=0)  # SD: images per VAE call while building the store (global; 0 = 8 per device)
  rd.update(real_data)
  return ml_collections.ConfigDict(dict(
      generator_weight=0.0,   # softplus(-D(F(G(z), t))) in the generator loss
      critic_weight=0.0,      # softplus(D(fake)) + softplus(-D(real)) added to the fake-score loss
      # the critic's inputs are noised at t ~ U[0, max_timestep) (the official --diffusion_gan_max_timestep, 1000
      # in every official recipe; 1 = clean inputs, the official code without --diffusion_gan; 0 = all)
      max_timestep=1000,
      real_data=ml_collections.ConfigDict(rd)))


def dmd2(c, *, ttur: int, lr: float, batch_size: int, num_train_steps: int, gan_generator: float,
         gan_critic: float = 1e-2, warmup_processes: int = 1, **real_data) -> ml_collections.ConfigDict:
  """Turns a DMD config into a DMD2 recipe (docs/method.md §7): no regression pairs, ``ttur`` fake-score updates
  per generator update, the same ``lr`` for both networks, the warm-up's scheduler steps spread over
  ``warmup_processes`` (the official run's GPU count: ``optim_config``), and the GAN terms (0 = none)."""
  c.optim.warmup_processes = warmup_processes
  c.regression.weight = 0.0
  c.dmd.fake_updates_per_generator_update = ttur
  c.optim.lr = lr
  c.batch_size = batch_size
  c.regression.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.gan.generator_weight = gan_generator
  c.gan.critic_weight = gan_critic if gan_generator else 0.0
  c.gan.real_data.update(real_data)
  return c


# ---- evaluators: ``config.evals.<name> = <one of these>`` (``evaluation/evaluators.py``; type '' = off) ----

def evals(**specs) -> ml_collections.ConfigDict:
  """``config.evals``: the run's evaluators by name, each a dict with its ``type`` (a key of
  ``evaluators.EVALUATORS``; '' turns it off, e.g. ``--config.evals.fid.type=``), ``every_steps`` (> 0: also
  during training, every this many steps; 0: at the end of training and in ``--mode=eval`` only) and its own
  settings. They run in the order given."""
  return ml_collections.ConfigDict({name: ml_collections.ConfigDict(spec) for name, spec in specs.items()})


def grid_eval(num_samples: int = 64) -> dict:
  """A PNG of ``num_samples`` generator samples above as many teacher samples from the same noise
  (``samples/step<N>.png``, at the end of training)."""
  return dict(type="grid", every_steps=0, num_samples=num_samples)


def toy_eval(num_samples: int = 20_000) -> dict:
  """The toy's distribution metrics (TV, precision, mode shares, MMD²) and a scatter PNG (docs/toy.md)."""
  return dict(type="toy", every_steps=0, num_samples=num_samples)


def fid_eval(*, num_samples: int, batch_size: int, protocol: str, every_steps: int = 0,
             periodic_num_samples: int = 5_000) -> dict:
  """FID of one-step samples (docs/method.md §8)."""
  return dict(
      type="fid",
      every_steps=every_steps,          # > 0: a monitoring FID on periodic_num_samples every this many steps
      num_samples=num_samples,          # the final FID's samples
      periodic_num_samples=periodic_num_samples,
      batch_size=batch_size,            # images per generation / Inception step (global)
      inception_path="",                # a folder written by `python -m dmd_jax.convert inception`; '' = off
      reference_stats="",               # .npz with mu, sigma (EDM's fid-refs); 'teacher' = the teacher's samples
      protocol=protocol)                # 'tf1' (EDM / DMD numbers) or 'pytorch_fid'


def coco_eval(*, num_samples: int, batch_size: int, image_size: int = 256) -> dict:
  """Text-to-image: COCO FID under the clean-fid protocol and CLIP score (docs/method.md §8;
  ``evaluation/text_to_image.py``), at the end of training."""
  return dict(
      type="coco",
      every_steps=0,
      num_samples=num_samples,          # captions (one image each)
      batch_size=batch_size,            # images per generation / Inception / CLIP step (global)
      captions="coco_captions",         # tfds coco_captions/2014 (first caption of each image), 'train_prompts',
                                        # or a UTF-8 file with one caption a line
      captions_split="val+test+restval",   # tfds's 2014 splits; val+test+restval = the val2014 images
      data_dir="",                      # tfds data_dir of the prepared coco_captions (ArrayRecord); '' = default
      inception_path="",                # a folder written by `python -m dmd_jax.convert inception`
      reference_stats="tfds",           # 'tfds' (reference_split, cached), an .npz with mu / sigma, or 'teacher'
      reference_split="val+test+restval",
      image_size=image_size,            # FID: centre crop + Lanczos to this size, then clean-fid's 299 resize
                                        # (the DMD2 evaluation's --eval_res: 256, SDXL 512)
      clip_path="",                     # a folder written by `python -m dmd_jax.convert clip` ('' = no CLIP score)
      clip_resize_256=True)             # Lanczos-256 before CLIP's preprocessing (the GigaGAN / DMD2 eval code)


def digits_eval(*, num_samples: int, every_steps: int = 0) -> dict:
  """The digits proof's metrics in a small classifier's features (``evaluation/digits.py``, docs/digits.md)."""
  return dict(type="digits", every_steps=every_steps, num_samples=num_samples,
              teacher=False)            # also the teacher's Heun samples' metrics (cached in the workdir)


def cpu_sized(c, *, batch_size: int, num_train_steps: int, checkpoint_every: int, log_every: int,
              warmup_steps: int, num_pairs: int, pair_shard_size: int, pair_sampler_steps: int,
              ) -> ml_collections.ConfigDict:
  """The ``:tiny`` sizes shared by the image configs (each config file states its numbers): float32, DM and
  regression batches, step counts, warm-up (on one process) and the regression set's size, shards and teacher
  steps."""
  c.model.dtype = "float32"
  if "remat" in c.model:
    c.model.remat = False
  c.batch_size = c.regression.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.checkpoint_every = checkpoint_every
  c.log_every = log_every
  c.optim.warmup_steps, c.optim.warmup_processes = warmup_steps, 1
  c.regression.update(num_pairs=num_pairs, shard_size=pair_shard_size, sampler_steps=pair_sampler_steps)
  return c
