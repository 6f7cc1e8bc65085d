"""DMD on ImageNet 64×64 with the EDM ADM teacher (DMD paper, ImageNet rows; docs/method.md §2–6).

Variants (``--config=configs/imagenet64.py:VARIANTS``):
  (default)  edm-imagenet-64x64-cond-adm (DhariwalUNet, 296M parameters), lr 2e-6, batch 336, 350k steps,
             lambda_reg 0.25, 25k pairs from 256-step EDM Heun, bf16 activations
  dmd2       DMD2 (docs/method.md §7): no regression pairs, two time-scale rule (5 fake-score updates per
             generator update), lr 2e-6 for both, global batch 280, GAN 3e-3 (generator) / 1e-2 (critic) with the
             head on the 768 × 8 × 8 encoder output, real images + labels from tfds imagenet_resized/64x64, 400k
             iterations. Paper: FID 1.51 (no regression 3.48, + TTUR 2.61, + GAN 1.51)
  dmd2,stage2  the paper's longer run: resume the dmd2 run at lr 5e-7 for another 150k iterations (FID 1.28)
  tiny       the same pipeline with a small random-weight ADM teacher, CPU-sized (the test suite)

  python -m dmd_jax.convert edm --src=edm-imagenet-64x64-cond-adm.pkl --dst=teachers/imagenet64
  python -m dmd_jax.main --config=configs/imagenet64.py --config.teacher.path=teachers/imagenet64 --workdir=...
"""
from dmd_jax.config_lib import dmd2, edm_config, parse_variants

TINY_ADM = dict(
    img_resolution=16, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=64,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=0, dropout=0.0)
# The init_kwargs of edm-imagenet-64x64-cond-adm.pkl (EDM's --arch=adm --dropout=0.1 --augment=0): what
# `python -m dmd_jax.plan` compiles before the checkpoint is converted (295,899,267 parameters).
ADM = dict(
    img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
    channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1,
    label_dropout=0.0, augment_dim=0)


def get_config(arg: str = ""):
  v = parse_variants(arg, {"tiny", "dmd2", "stage2"})
  c = edm_config(
      lr=2e-6, batch_size=336, num_train_steps=350_000,
      regression_weight=0.25,
      num_pairs=25_000,
      sampler_steps=256,                     # EDM Heun, 511 NFE
      tiny_init_kwargs=TINY_ADM if "tiny" in v else None,
      architecture=ADM)
  if "stage2" in v and "dmd2" not in v:
    raise ValueError("configs/imagenet64.py: 'stage2' is a stage of 'dmd2' (use :dmd2,stage2)")
  if "dmd2" in v:
    stage2 = "stage2" in v
    dmd2(c, ttur=5, lr=5e-7 if stage2 else 2e-6, batch_size=280, num_train_steps=550_000 if stage2 else 400_000,
         gan_generator=3e-3, gan_critic=1e-2, source="tfds", dataset="imagenet_resized/64x64")
    if "tiny" in v:
      c.batch_size = c.regression.batch_size = 8
      c.num_train_steps = 8 if stage2 else 6
  return c
