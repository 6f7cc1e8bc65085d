"""DMD on CIFAR-10 with EDM teachers (DMD paper, CIFAR-10 rows; docs/method.md §2–6).

Variants (``--config=configs/cifar10.py:VARIANTS``, comma-separated):
  cond (default)  class-conditional teacher edm-cifar10-32x32-cond-vp (DDPM++), lambda_reg 0.25, 100k pairs
  uncond          unconditional teacher edm-cifar10-32x32-uncond-vp, lambda_reg 0.5, 500k pairs
  dmd2            DMD2's recipe carried to CIFAR-10 (no published DMD2 CIFAR run: the ImageNet-64 choices —
                  no regression, two time-scale rule 5, GAN 3e-3 / 1e-2 on the DDPM++ encoder output, real images +
                  labels from tfds cifar10 — at DMD's CIFAR lr 5e-5 and batch 392, 300k iterations)
  tiny            the same pipeline with a small random-weight DDPM++ teacher, CPU-sized (the test suite)

Convert the teacher first, then point ``teacher.path`` at it:
  python -m dmd_jax.convert edm --src=edm-cifar10-32x32-cond-vp.pkl --dst=teachers/cifar10-cond
  python -m dmd_jax.main --config=configs/cifar10.py --config.teacher.path=teachers/cifar10-cond --workdir=...
"""
from dmd_jax.config_lib import dmd2, parse_variants
from dmd_jax.families.edm.config import edm_config

TINY_DDPMPP = dict(
    img_resolution=16, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.0)
# The init_kwargs of edm-cifar10-32x32-{cond,uncond}-vp.pkl (EDM's --arch=ddpmpp --cond=1/0 --augment=0.12
# --dropout=0.13): what `python -m dmd_jax.plan` compiles before the checkpoint is converted.
DDPMPP = dict(
    img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9, dropout=0.13)


def get_config(arg: str = ""):
  v = parse_variants(arg, {"cond", "uncond", "tiny", "dmd2"})
  uncond = "uncond" in v
  tiny = None
  if "tiny" in v:
    tiny = dict(TINY_DDPMPP, label_dim=0 if uncond else 10)
  c = edm_config(
      lr=5e-5, batch_size=392, num_train_steps=300_000,
      regression_weight=0.5 if uncond else 0.25,
      num_pairs=500_000 if uncond else 100_000,
      sampler_steps=18,                      # EDM Heun, 35 NFE
      tiny_init_kwargs=tiny,
      architecture=dict(DDPMPP, label_dim=0 if uncond else 10))
  if "dmd2" in v:
    dmd2(c, ttur=5, lr=5e-5, batch_size=392, num_train_steps=300_000, gan_generator=3e-3, gan_critic=1e-2,
         source="tfds", dataset="cifar10")
    if tiny:
      c.batch_size = c.regression.batch_size = 8
      c.num_train_steps = 6
  return c
