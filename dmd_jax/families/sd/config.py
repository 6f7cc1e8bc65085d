"""The Stable Diffusion family's config builder (``configs/coco.py``)."""
from __future__ import annotations

import ml_collections

from dmd_jax.config_lib import base_config, lora_config


# A handful of prompts for configs/coco.py:tiny (the tiny tokenizer knows the letters, 'red' and 'bus').
TINY_PROMPTS = ("a red bus", "a bus", "a red car on a road", "two birds", "a cat on a mat", "red apples",
                "a house by a lake", "a dog")


def sd_config(*, guidance_scale: float, lr: float, batch_size: int, num_train_steps: int,
              regression_weight: float, regression_batch_size: int, num_pairs: int, sampler_steps: int,
              num_prompts: int, family: str = "sd") -> ml_collections.ConfigDict:
  """A text-to-image DMD config on a Stable Diffusion teacher (docs/method.md §2–6) with the recipe's numbers;
  the config file adds its evaluators (``config.evals``) and its ``:tiny`` sizes (:func:`random_pipeline`)."""
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(
      family=family,
      dtype="bfloat16",     # activations; parameters, optimizer state, eps -> x0 and the DM loss stay float32
      remat=True,           # gradient checkpointing of every UNet block (docs/method.md §6)
      # 'auto' (GPU: cuDNN flash for bf16; TPU: splash for long self-attention; else XLA), 'xla', 'cudnn',
      # 'splash' (docs/attention.md)
      attention="auto",
      latent_resolution=0,  # 0: the UNet config's sample_size (64 for SD 1.5: 512 px images)
      lora=lora_config()))
  c.teacher = ml_collections.ConfigDict(dict(
      path=""))             # a folder written by `python -m dmd_jax.convert <family>`; 'random' for :tiny
  c.guidance_scale = guidance_scale   # classifier-free guidance of the real score only
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
      num_prompts=num_prompts,   # the first this many (0 = all)
      embedding_batch_size=256,
      embedding_dtype="float32"))   # of the cached text embeddings: 'float32' or 'float16' (half the disk)
  c.optim.lr = lr
  c.batch_size = batch_size  # DM batch (global)
  c.num_train_steps = num_train_steps
  c.checkpoint_every = 1_000
  c.log_every = 50
  c.regression = ml_collections.ConfigDict(dict(
      weight=regression_weight,
      distance="lpips",     # LPIPS-VGG on VAE-decoded images (docs/method.md §5); 'l2' / 'mse' compare latents
      lpips_path="",        # a folder written by `python -m dmd_jax.convert lpips --src=vgg16.pth`
      lpips_resize=224,     # upsampling of smaller images only (SD's 512 px images are compared as they are)
      num_pairs=num_pairs,  # pair i: prompt i mod P, the teacher's guided sampler from noise z_i
      shard_size=1_000,
      batch_size=regression_batch_size,
      sampler="pndm",       # 'pndm' (the paper's) or 'ddim'
      sampler_steps=sampler_steps))
  return c


def random_pipeline(c) -> ml_collections.ConfigDict:
  """``:tiny``: a random-weight tiny pipeline written under the workdir through the real converter, the
  built-in :data:`TINY_PROMPTS`, a random LPIPS on the 16 px decoded images as they are, and for the COCO
  evaluator random Inception and CLIP networks against the teacher's samples for the training prompts."""
  c.teacher.path = "random"
  c.data.update(prompts=TINY_PROMPTS, num_prompts=0, embedding_batch_size=8)
  c.regression.update(lpips_path="random", lpips_resize=0)
  if "coco" in c.get("evals", {}):
    c.evals.coco.update(captions="train_prompts", inception_path="random", clip_path="random",
                        reference_stats="teacher")
  return c
