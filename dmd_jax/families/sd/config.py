"""The Stable Diffusion family's config builder (``configs/coco.py``)."""
from __future__ import annotations

import ml_collections

from dmd_jax.config_lib import base_config, lora_config


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
