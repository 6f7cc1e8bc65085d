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


# A handful of prompts for configs/coco.py:tiny (the tiny tokenizer knows the letters, 'red' and 'bus').
TINY_PROMPTS = ("a red bus", "a bus", "a red car on a road", "two birds", "a cat on a mat", "red apples",
                "a house by a lake", "a dog")


def sd_config(*, tiny: bool) -> ml_collections.ConfigDict:
  """The DMD text-to-image recipe on Stable Diffusion v1.5 (docs/method.md §2–6; see configs/coco.py).
  ``tiny`` switches to a random-weight tiny pipeline written under the workdir, built-in prompts and
  CPU-sized batches and step counts."""
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(
      family="sd",
      dtype="bfloat16",     # activations; parameters, optimizer state, eps -> x0 and the DM loss stay float32
      remat=True,           # gradient checkpointing of every UNet block (docs/method.md §6)
      # 'auto' (GPU: cuDNN flash for bf16; TPU: splash for long self-attention; else XLA), 'xla', 'cudnn',
      # 'splash' (docs/attention.md)
      attention="auto",
      latent_resolution=0,  # 0: the UNet config's sample_size (64 for SD 1.5: 512 px images)
      lora=lora_config()))
  c.teacher = ml_collections.ConfigDict(dict(
      path=""))             # a folder written by `python -m dmd_jax.convert sd`; 'random' for :tiny
  c.guidance_scale = 3.0    # classifier-free guidance of the real score only (DMD COCO/FID model)
  c.generator = ml_collections.ConfigDict(dict(
      timestep=999,         # G(z, c) = x0(UNet(z; t=999, c))
      steps=()))            # DMD2 multi-step: DDPM timesteps, e.g. (999, 749, 499, 249); () = one step
  c.schedule = ml_collections.ConfigDict(dict(
      kind="vp", beta_start=0.00085, beta_end=0.012, num_timesteps=1000, dm_t_min=20, dm_t_max=980))
  c.data = ml_collections.ConfigDict(dict(
      prompts_file="",      # UTF-8 text, one prompt a line (DMD: 500k LAION prompts; or COCO captions)
      prompts=(),           # or the prompts themselves (the :tiny config)
      coco_split="",        # or every caption of this split of a prepared tfds coco_captions/2014 ('train')
      data_dir="",          # tfds data_dir for coco_split ('' = tfds's default)
      num_prompts=500_000,  # the first this many (0 = all)
      embedding_batch_size=256,
      embedding_dtype="float32"))   # of the cached CLIP embeddings: 'float32' or 'float16' (half the disk)
  c.optim.lr = 1e-5
  c.batch_size = 2304       # DM batch (global)
  c.num_train_steps = 20_000
  c.checkpoint_every = 1_000
  c.log_every = 50
  c.regression = ml_collections.ConfigDict(dict(
      weight=0.25,
      distance="lpips",     # LPIPS-VGG on VAE-decoded images (docs/method.md §5); 'l2' / 'mse' compare latents
      lpips_path="",        # a folder written by `python -m dmd_jax.convert lpips --src=vgg16.pth`
      lpips_resize=224,     # upsampling of smaller images only (SD's 512 px images are compared as they are)
      num_pairs=500_000,    # pair i: prompt i mod P, PNDM-50 with guidance 3 from noise z_i
      shard_size=1_000,
      batch_size=1152,
      sampler="pndm",       # 'pndm' (the paper's) or 'ddim'
      sampler_steps=50))
  # docs/method.md §8: COCO-30k FID (clean-fid protocol against the 40,504 val2014 images) and CLIP score
  # (OpenCLIP ViT-g/14, "A photo depicts <caption>"); dmd_jax/evaluation/text_to_image.py
  c.eval = ml_collections.ConfigDict(dict(
      evaluators=("grid", "coco"),  # evaluation/evaluators.py: sample picture, COCO FID + CLIP score
      num_samples=30_000,
      batch_size=64,        # images per generation / Inception / CLIP step (global)
      captions="coco_captions",   # tfds coco_captions/2014 (first caption of each image), 'train_prompts', or a file
      captions_split="val+test+restval",   # tfds's 2014 splits; val+test+restval = the val2014 images
      data_dir="",          # tfds data_dir of the prepared coco_captions (ArrayRecord); '' = tfds's default
      inception_path="",    # a folder written by `python -m dmd_jax.convert inception`
      reference_stats="tfds",   # 'tfds' (eval.reference_split, cached), an .npz with mu / sigma, or 'teacher'
      reference_split="val+test+restval",
      clip_path="",         # a folder written by `python -m dmd_jax.convert clip` ('' = no CLIP score)
      clip_resize_256=True,  # Lanczos-256 before CLIP's preprocessing, as the GigaGAN / DMD2 evaluation code
      protocol="clean", every_steps=0, periodic_num_samples=0,
      grid_samples=16))     # one-step and teacher samples in samples/step<N>.png at the end of training
  if tiny:
    c.teacher.path = "random"
    c.data.prompts = TINY_PROMPTS
    c.data.num_prompts = 0
    c.data.embedding_batch_size = 8
    c.regression.lpips_path = "random"
    c.regression.lpips_resize = 0    # LPIPS on the 16 px decoded images as they are
    c.model.dtype = "float32"
    c.model.remat = False
    c.batch_size = 4
    c.num_train_steps = 4
    c.checkpoint_every = 100  # at the end only (saving ~1000 small arrays is slow on a CPU)
    c.log_every = 1
    c.regression.num_pairs = 8
    c.regression.shard_size = 4
    c.regression.batch_size = 4
    c.regression.sampler_steps = 3
    c.optim.warmup_steps = 2
    c.eval.grid_samples = 4
    c.eval.num_samples = 8
    c.eval.batch_size = 4
    c.eval.captions = "train_prompts"
    c.eval.inception_path = "random"
    c.eval.clip_path = "random"
    c.eval.reference_stats = "teacher"
  return c
