"""DMD on ImageNet 64×64 with the EDM ADM teacher (DMD paper, ImageNet rows; docs/method.md §2–6).

Variants (``--config=configs/imagenet64.py:VARIANTS``):
  (default)  edm-imagenet-64x64-cond-adm (DhariwalUNet, 296M parameters), lr 2e-6, batch 336, 350k steps,
             lambda_reg 0.25, 25k pairs from 256-step EDM Heun, bf16 activations
  ttur       DMD2 without the GAN (the official experiments/imagenet/imagenet_lr2e-6_scratch.sh): no regression
             pairs, two time-scale rule 5 (--dfake_gen_update_ratio 5), lr 2e-6 for both networks, batch 40 on
             each of 7 GPUs = 280, 500 warm-up scheduler steps over 7 processes (≈ 72 iterations), 405,500
             iterations (the model zoo's checkpoint_model_405500 of experiments/imagenet/README.md: FID 2.61)
  dmd2       the same with the GAN from scratch (imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh):
             --gen_cls_loss_weight 3e-3, --cls_loss_weight 1e-2, --diffusion_gan_max_timestep 1000, the head on
             the 768 × 8 × 8 encoder output, real images + labels from tfds imagenet_resized/64x64; 193,500
             iterations (checkpoint_model_193500: FID 1.51)
  dmd2,stage2  the model zoo's FID-1.28 run (..._lr5e-7_resume.sh): a NEW run initialised from a ``:ttur``
             checkpoint (--ckpt_only_path imagenet_lr2e-6_scratch_fid2.61_checkpoint_model_405500: networks only,
             new optimisers and warm-up; our ``init_from.workdir``), the GAN head added, lr 5e-7, 142,500 more
             iterations (checkpoint_model_548000 − 405,500; "an additional 140,000 iterations")
  tiny       the same pipeline with a small random-weight ADM teacher, CPU-sized (the test suite)

  python -m dmd_jax.convert edm --src=edm-imagenet-64x64-cond-adm.pkl --dst=teachers/imagenet64
  python -m dmd_jax.main --config=configs/imagenet64.py --config.teacher.path=teachers/imagenet64 --workdir=...
  python -m dmd_jax.main --config=configs/imagenet64.py:ttur ... --workdir=runs/in64_ttur
  python -m dmd_jax.main --config=configs/imagenet64.py:dmd2,stage2 ... --workdir=runs/in64_stage2 \
      --config.init_from.workdir=runs/in64_ttur
"""
from dmd_jax.config_lib import cpu_sized, dmd2, evals, fid_eval, grid_eval, parse_variants
from dmd_jax.families.edm.config import edm_config, random_teacher

# The init_kwargs of edm-imagenet-64x64-cond-adm.pkl (EDM's --arch=adm --dropout=0.1 --augment=0): what
# `python -m dmd_jax.plan` compiles before the checkpoint is converted (295,899,267 parameters).
ADM = dict(
    img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
    channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1,
    label_dropout=0.0, augment_dim=0)
# :tiny: the same ADM at 16 px, two levels of 64 / 128 channels, one block each, no dropout
TINY_ADM = dict(
    img_resolution=16, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=64,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=0, dropout=0.0)


def get_config(arg: str = ""):
  v = parse_variants(arg, {"tiny", "ttur", "dmd2", "stage2"})
  c = edm_config(
      lr=2e-6, batch_size=336, num_train_steps=350_000,   # DMD paper, ImageNet 64 (docs/method.md §6)
      regression_weight=0.25,
      num_pairs=25_000,
      sampler_steps=256,                                  # EDM Heun, 511 NFE
      architecture=ADM)
  # docs/method.md §8: 50k samples, TF-FID protocol, EDM's reference statistics (eval.fid.reference_stats)
  c.evals = evals(grid=grid_eval(num_samples=64),
                  fid=fid_eval(num_samples=50_000, batch_size=500, protocol="tf1"))
  if "stage2" in v and "dmd2" not in v:
    raise ValueError("configs/imagenet64.py: 'stage2' is a stage of 'dmd2' (use :dmd2,stage2)")
  if "ttur" in v and "dmd2" in v:
    raise ValueError("configs/imagenet64.py: 'ttur' is DMD2 without the GAN; 'dmd2' adds it (pick one)")
  if "ttur" in v or "dmd2" in v:
    stage2 = "stage2" in v
    steps = 142_500 if stage2 else 193_500 if "dmd2" in v else 405_500
    dmd2(c, ttur=5, lr=5e-7 if stage2 else 2e-6, batch_size=280, num_train_steps=steps,
         gan_generator=3e-3 if "dmd2" in v else 0.0, gan_critic=1e-2, warmup_processes=7,
         source="tfds", dataset="imagenet_resized/64x64")
  if "tiny" in v:   # the test suite: a random-weight teacher written under the workdir, CPU sizes
    random_teacher(c, TINY_ADM)
    cpu_sized(c, batch_size=8, num_train_steps=6, checkpoint_every=3, log_every=2, warmup_steps=2,
              num_pairs=24, pair_shard_size=8, pair_sampler_steps=4)
    c.evals.fid.update(num_samples=16, periodic_num_samples=8, batch_size=8)
  return c
