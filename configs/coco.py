"""DMD text-to-image on Stable Diffusion v1.5 (the DMD paper's LAION → COCO rows; docs/method.md §2–6).

Variants (``--config=configs/coco.py:VARIANTS``):
  (default)  SD v1.5 teacher (converted folder), lr 1e-5 (AdamW, 500 warm-up steps, then constant), guidance 3
             on the real score, lambda_reg 0.25 (LPIPS on VAE-decoded images), bf16 activations, rematerialised
             UNet blocks, batch 2304 DM + 1152 regression, 20k iterations, 500k prompts, regression pairs from
             PNDM 50 steps with guidance 3
  dmd2       DMD2 SD 1.5 stage 1 (docs/method.md §7; the official experiments/sdv1.5/
             laion6.25_sd_baseline_8node_guidance1.75_lr1e-5_seed10_dfake10_from_scratch.sh): real guidance 1.75,
             no regression pairs, two time-scale rule 10, lr 1e-5 for both networks, batch 32 on each of 64 GPUs
             = 2048, 500 warm-up scheduler steps over 64 processes (≈ 8 iterations), no GAN, 39,000 iterations
             (experiments/sdv1.5/README.md: checkpoint_model_039000, FID 9.28)
  dmd2,stage2  stage 2 (..._lr5e-7_seed10_dfake10_diffusion1000_gan1e-3_noode_resume_fixdata.sh): a NEW run
             initialised from stage 1 (--ckpt_only_path: networks only, new optimisers and warm-up; our
             ``init_from.workdir``) with the GAN (--gen_cls_loss_weight 1e-3, --guidance_cls_loss_weight 1e-2,
             --diffusion_gan_max_timestep 1000; head on the 1280 × 8 × 8 mid-block output; real COCO train images
             VAE-encoded once with their captions) at lr 5e-7 for 2,000 more iterations (checkpoint_model_041000:
             COCO-30k FID 8.35)
  lora       the generator trains LoRA adapters (rank 64, alpha 8; the official DMD2 SDXL LoRA run's targets:
             attention q/k/v/out, proj_in/out, feed-forward, resnet convs and shortcut, time-embedding projection,
             down/up-sampler convs) on the teacher's own frozen arrays (docs/lora.md); rank 4 with tiny
  tiny       the same pipeline with a random-weight tiny SD pipeline (written under the workdir through the
             real converter), 8 built-in prompts, CPU-sized batches (the test suite)

  python -m dmd_jax.convert sd --src=stable-diffusion-v1-5/ --dst=teachers/sd15
  python -m dmd_jax.convert lpips --src=vgg16-397923af.pth --dst=nets/lpips
  python -m dmd_jax.main --config=configs/coco.py --workdir=runs/coco --config.teacher.path=teachers/sd15 \\
      --config.regression.lpips_path=nets/lpips --config.data.prompts_file=prompts.txt
  python -m dmd_jax.main --config=configs/coco.py --workdir=runs/coco --config.teacher.path=teachers/sd15 \\
      --config.regression.lpips_path=nets/lpips --config.data.prompts_file=prompts.txt \\
      --mode=sample --prompt="a red bus" --num_samples=4 --output=bus.png
  python -m dmd_jax.main --config=configs/coco.py:dmd2 ... --workdir=runs/coco_stage1
  python -m dmd_jax.main --config=configs/coco.py:dmd2,stage2 ... --workdir=runs/coco_stage2 \
      --config.init_from.workdir=runs/coco_stage1

Prompts: ``data.prompts_file`` (one a line; the first ``data.num_prompts``); their CLIP embeddings are computed
once and cached in the workdir (``dmd_jax/data/prompts.py``; 500k × 77 × 768 float32 is 118 GB on disk,
``--config.data.embedding_dtype=float16`` halves it). ``--mode=pairs`` builds the regression set first
(pair i: prompt i mod P); ``--mode=sample --prompt=...`` writes a PNG grid of one-step 512 px images
(VAE-decoded), deterministic for ``--seed``; ``--mode=teacher_sample`` writes guided-PNDM teacher images
(uint8, VAE-decoded) for prompts drawn from the first 64 training prompts as an .npz. The tokenizer needs
``transformers`` (``pip install -e '.[sd]'``; torch is not needed).

Evaluation (``--mode=eval``, and at the end of training; docs/method.md §8, dmd_jax/evaluation/text_to_image.py):
COCO-30k FID under the clean-fid protocol (centre crop, Lanczos 256, clean resize 299) against the 40,504
val2014 images, and CLIP score on "A photo depicts <caption>":

  python -m dmd_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth --dst=nets/inception
  python -m dmd_jax.convert clip --src=CLIP-ViT-g-14-laion2B-s12B-b42K/ --dst=nets/clip_g14
  python -m dmd_jax.main --config=configs/coco.py --workdir=runs/coco --mode=eval --config.teacher.path=... \
      --config.evals.coco.inception_path=nets/inception --config.evals.coco.clip_path=nets/clip_g14 \
      --config.evals.coco.data_dir=~/tensorflow_datasets     # a prepared coco_captions/2014 (ArrayRecord)

Captions: the first caption of each of the first 30k val2014 images (``evals.coco.captions='coco_captions'``),
or ``evals.coco.captions=FILE`` for a paper's exact caption list. Reference:
``evals.coco.reference_stats='tfds'`` computes (once, cached in the workdir) the statistics of every image of
``evals.coco.reference_split``; an ``.npz`` with ``mu`` / ``sigma`` or ``'teacher'`` (FID to the teacher's
guided samples for the same captions) also work.
"""
from dmd_jax.config_lib import coco_eval, cpu_sized, dmd2, evals, grid_eval, lora, parse_variants
from dmd_jax.families.sd.config import random_pipeline, sd_config


def get_config(arg: str = ""):
  v = parse_variants(arg, {"tiny", "dmd2", "stage2", "lora"})
  tiny = "tiny" in v
  # DMD paper, LAION -> COCO (docs/method.md §6): lr 1e-5, guidance 3, batch 2304 DM + 1152 regression, 20k
  # iterations, 500k prompts, lambda_reg 0.25 on pairs from PNDM 50 steps
  c = sd_config(guidance_scale=3.0, lr=1e-5, batch_size=2304, num_train_steps=20_000, regression_weight=0.25,
                regression_batch_size=1152, num_pairs=500_000, sampler_steps=50, num_prompts=500_000)
  # docs/method.md §8: COCO-30k FID (clean-fid protocol against the 40,504 val2014 images) and CLIP score
  # (OpenCLIP ViT-g/14, "A photo depicts <caption>")
  c.evals = evals(grid=grid_eval(num_samples=16),
                  coco=coco_eval(num_samples=30_000, batch_size=64))
  if "stage2" in v and "dmd2" not in v:
    raise ValueError("configs/coco.py: 'stage2' is a stage of 'dmd2' (use :dmd2,stage2)")
  if "dmd2" in v:
    stage2 = "stage2" in v
    c.guidance_scale = 1.75
    dmd2(c, ttur=10, lr=5e-7 if stage2 else 1e-5, batch_size=2048, num_train_steps=2_000 if stage2 else 39_000,
         gan_generator=1e-3 if stage2 else 0.0, gan_critic=1e-2, warmup_processes=64, source="coco_latents",
         dataset="coco_captions", num_images=82_783)   # every image of coco_captions/2014 train
  if "lora" in v:
    lora(c, rank=4 if tiny else 64)
  if tiny:   # the test suite: a random-weight tiny pipeline written under the workdir, CPU sizes
    random_pipeline(c)
    cpu_sized(c, batch_size=4, num_train_steps=2 if "stage2" in v else 4, checkpoint_every=100, log_every=1,
              warmup_steps=2, num_pairs=8, pair_shard_size=4, pair_sampler_steps=3)
    c.evals.grid.num_samples = 4
    c.evals.coco.update(num_samples=8, batch_size=4)
    if "dmd2" in v:
      c.gan.real_data.update(num_images=6, shard_size=3)  # the suite's prepared coco_captions train split has 7
  return c
