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
from dmd_jax.config_lib import cpu_sized, dmd2, evals, fid_eval, grid_eval, parse_variants
from dmd_jax.families.edm.config import edm_config, random_teacher

# The init_kwargs of edm-cifar10-32x32-{cond,uncond}-vp.pkl (EDM's --arch=ddpmpp --cond=1/0 --augment=0.12
# --dropout=0.13): what `python -m dmd_jax.plan` compiles before the checkpoint is converted.
DDPMPP = dict(
    img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9, dropout=0.13)
# :tiny: the same SongUNet at 16 px, two levels of 16 / 32 channels, one block each, no dropout
TINY_DDPMPP = dict(DDPMPP, img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], dropout=0.0)


def get_config(arg: str = ""):
  v = parse_variants(arg, {"cond", "uncond", "tiny", "dmd2"})
  uncond = "uncond" in v
  label_dim = 0 if uncond else 10
  c = edm_config(
      lr=5e-5, batch_size=392, num_train_steps=300_000,   # DMD paper, CIFAR-10 (docs/method.md §6)
      regression_weight=0.5 if uncond else 0.25,          # lambda_reg (DMD appendix: 0.5 unconditional)
      num_pairs=500_000 if uncond else 100_000,
      sampler_steps=18,                                   # EDM Heun, 35 NFE
      architecture=dict(DDPMPP, label_dim=label_dim))
  # docs/method.md §8: 50k samples, TF-FID protocol, EDM's reference statistics (eval.fid.reference_stats)
  c.evals = evals(grid=grid_eval(num_samples=64),
                  fid=fid_eval(num_samples=50_000, batch_size=500, protocol="tf1"))
  if "dmd2" in v:
    dmd2(c, ttur=5, lr=5e-5, batch_size=392, num_train_steps=300_000, gan_generator=3e-3, gan_critic=1e-2,
         source="tfds", dataset="cifar10")
  if "tiny" in v:   # the test suite: a random-weight teacher written under the workdir, CPU sizes
    random_teacher(c, dict(TINY_DDPMPP, label_dim=label_dim))
    cpu_sized(c, batch_size=8, num_train_steps=6, checkpoint_every=3, log_every=2, warmup_steps=2,
              num_pairs=24, pair_shard_size=8, pair_sampler_steps=4)
    c.evals.fid.update(num_samples=16, periodic_num_samples=8, batch_size=8)
  return c
