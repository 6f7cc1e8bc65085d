"""DMD on ImageNet 64×64 with the EDM ADM teacher (DMD paper, ImageNet rows; docs/method.md §2–6).

Variants (``--config=configs/imagenet64.py:VARIANTS``):
  (default)  edm-imagenet-64x64-cond-adm (DhariwalUNet, 296M parameters), lr 2e-6, batch 336, 350k steps,
             lambda_reg 0.25, 25k pairs from 256-step EDM Heun, bf16 activations
  tiny       the same pipeline with a small random-weight ADM teacher, CPU-sized (the test suite)

  python -m dmd_jax.convert edm --src=edm-imagenet-64x64-cond-adm.pkl --dst=teachers/imagenet64
  python -m dmd_jax.main --config=configs/imagenet64.py --config.teacher.path=teachers/imagenet64 --workdir=...
"""
from dmd_jax.config_lib import edm_config, parse_variants

TINY_ADM = dict(
    img_resolution=16, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=64,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=0, dropout=0.0)


def get_config(arg: str = ""):
  v = parse_variants(arg, {"tiny"})
  return edm_config(
      lr=2e-6, batch_size=336, num_train_steps=350_000,
      regression_weight=0.25,
      num_pairs=25_000,
      sampler_steps=256,                     # EDM Heun, 511 NFE
      tiny_init_kwargs=TINY_ADM if "tiny" in v else None)
