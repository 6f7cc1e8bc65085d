"""The image-space proof on one CPU (docs/digits.md): scikit-learn's 1,797 digits (8 × 8, 17 grey levels),
bilinearly resized to 16 × 16 in [-1, 1], class-conditional. A small EDM teacher (SongUNet, EDMPrecond) is
**trained here**, then distilled.

  # 1. train the teacher (EDM's denoising loss; resumable); writes RUN/teacher (the converted-teacher format)
  python -m dmd_jax.main --config=configs/digits.py --workdir=runs/digits_teacher --mode=teacher_train
  # 2. distil it: DMD (regression pairs + distribution matching) or DMD2 (GAN on the real digits, TTUR)
  python -m dmd_jax.main --config=configs/digits.py:dmd --config.teacher.path=runs/digits_teacher/teacher \\
      --workdir=runs/digits_dmd
  python -m dmd_jax.main --config=configs/digits.py:dmd2 --config.teacher.path=runs/digits_teacher/teacher \\
      --workdir=runs/digits_dmd2

``bench/digits.py`` runs the study (docs/digits.md): teacher, DMD, DMD2 and their controls, with the digits
metrics of ``evaluation/digits.py`` every 250 iterations.

Variants (comma-separated):
  dmd (default)  DMD: distribution matching + regression on teacher Heun pairs, L2 distance (LPIPS-VGG at
                 16 px would look at 224 px bilinear blow-ups of 16 px grey digits: features VGG never saw)
  dmd2           DMD2: no regression, two time-scale rule 5, GAN 3e-3 / 1e-2 (the ImageNet-64 recipe's weights)
                 on the SongUNet encoder output (32 × 4 × 4: the head's GroupNorms at 8 groups of 4 channels,
                 models/gan_head.py), GAN noise t in [0, 1000), real data: the 1,797 digits with their labels;
                 lr 2e-4, 100 warm-up iterations, 1,250 iterations (250 generator updates). The official GAN
                 constants are kept: at this scale their critic does not separate real from generated digits
                 within the run, and the settings that make it separate (critic inputs at t < 500, critic
                 weight 1) give worse FIDs; docs/digits.md has the rows
  steps4         DMD2's four-step generator: timesteps 999, 749, 499, 249 with backward simulation, lr 2e-5,
                 600 iterations; meant to start from a one-step run's networks:
                 --config.init_from.workdir=runs/digits_dmd2 (docs/digits.md: at 2e-4 the low-sigma steps
                 coarsen)
  tiny           CPU-minutes sizes for the test suite (small teacher and step counts); everything else equal
"""
import json

import ml_collections

from dmd_jax.config_lib import cpu_sized, digits_eval, dmd2, evals, grid_eval, parse_variants
from dmd_jax.families.edm.config import edm_config

TEACHER = dict(
    img_resolution=16, img_channels=1, label_dim=10, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], augment_dim=0, dropout=0.1)
TINY_TEACHER = dict(TEACHER, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


def get_config(arg: str = ""):
  v = parse_variants(arg, {"dmd", "dmd2", "steps4", "tiny"})
  tiny = "tiny" in v
  c = edm_config(
      lr=2e-4, batch_size=32, num_train_steps=1_000,
      regression_weight=0.25, num_pairs=1_000,
      sampler_steps=18)                      # EDM Heun, 35 NFE: the pairs and the teacher row of the table
  c.model.dtype = "float32"                  # CPU: bfloat16 is emulated and slower
  c.digits = ml_collections.ConfigDict(dict(
      image_size=16,
      classifier_steps=500))                 # the metrics' classifier (evaluation/digits.py)
  c.teacher_train = ml_collections.ConfigDict(dict(
      dataset="digits",
      init_kwargs=json.dumps(TEACHER),
      steps=1_800,                           # ~115k images, ~64 epochs: ~9 min on 2 cores (docs/digits.md)
      batch_size=64,
      lr=1e-3,                               # Adam, EDM's CIFAR-10 lr
      lr_rampup_images=20_000,
      ema_halflife_images=20_000,
      ema_rampup_ratio=0.05,
      p_mean=-1.2, p_std=1.2,                # EDM's log-normal noise levels
      checkpoint_every=2_000,
      log_every=200))
  c.regression.distance = "l2"
  c.regression.shard_size = 500
  c.optim.warmup_steps = 100
  c.checkpoint_every = 500
  c.log_every = 100
  c.evals = evals(grid=grid_eval(num_samples=100),
                  # 898 = the real floor's half (evaluation/digits.py: equal FID bias)
                  digits=digits_eval(num_samples=898))
  c.gan.real_data.source = "digits"
  if "dmd2" in v or "steps4" in v:
    dmd2(c, ttur=5, lr=2e-4, batch_size=32, num_train_steps=1_250, gan_generator=3e-3, gan_critic=1e-2,
         source="digits")
  if "steps4" in v:
    c.generator.steps = (999, 749, 499, 249)
    c.optim.lr = 2e-5
    c.num_train_steps = 600
  if tiny:
    c.teacher_train.init_kwargs = json.dumps(TINY_TEACHER)
    c.teacher_train.update(steps=40, batch_size=32, checkpoint_every=20, log_every=10, lr_rampup_images=320)
    c.digits.classifier_steps = 80
    cpu_sized(c, batch_size=8, num_train_steps=6, checkpoint_every=3, log_every=3, warmup_steps=100,
              num_pairs=16, pair_shard_size=8, pair_sampler_steps=4)
    c.evals.grid.num_samples = 16
    c.evals.digits.num_samples = 64
  return c
