"""DMD2 on Stable Diffusion XL (DMD2 paper, SDXL rows; docs/method.md §7), the official recipes of
tianweiy/DMD2 experiments/sdxl/*.sh as this code runs them.

Variants (``--config=configs/sdxl.py:VARIANTS``):
  steps4 (default)  the 4-step generator (sdxl_cond999_8node_lr5e-7_denoising4step_diffusion1000_gan5e-3_
             guidance8_noinit_noode_backsim_scratch.sh): timesteps 999, 749, 499, 249 (--denoising
             --num_denoising_step 4 --denoising_timestep 1000) with backward simulation, real guidance 8, fake
             guidance 1, two time-scale rule 5, lr 5e-7 for both networks, AdamW, clipping 10, DM t in
             [0.02, 0.98]·1000 (--max_step_percent 0.98), GAN 5e-3 / 1e-2 on the fake UNet's 1280 × 32 × 32
             mid-block output (the SDXL head: three stride-2 convs, then the SD head's stride-4 and 1×1 convs;
             models/gan_head.py), diffusion-GAN t in [0, 1000), 1024 px (128² latents), batch 2 on each of 64
             GPUs = 128, 500 warm-up scheduler steps over 64 processes, 19,000 iterations (experiments/sdxl/
             README.md: checkpoint_model_019000, COCO-10k FID 19.32)
  lora       the same with a LoRA generator (..._backsim_scratch_lora.sh, --generator_lora): rank 64, alpha 8,
             dropout 0 on to_q/k/v/out.0, proj_in/out, ff.net.0.proj, ff.net.2, conv1/conv2/conv_shortcut,
             down/upsampler convs, time_emb_proj (main/sdxl/extract_lora_module.py's targets), lr 5e-5
  steps1     the 1-step generator at conditioning timestep 399 (sdxl_cond399_8node_lr5e-7_1step_diffusion1000_
             gan5e-3_guidance8_noinit_noode.sh): the same DMD2 terms at lr 5e-7, 24,000 iterations
             (checkpoint_model_024000: FID 19.01), initialised from the regression stage below
             (--generator_ckpt_path ..._ode_pretraining_10k_cond399_checkpoint_model_002000.bin; our
             ``init_from.workdir``)
  steps1,ode the regression pre-training of the 1-step generator (sdxl_lr1e-5_8node_ode_pretraining_10k_cond399.sh):
             LPIPS between VAE-decoded images of the generator at t = 399 and of the teacher's guided ODE
             solution from the same noise, 10k pairs (the official pairs: main/sdxl/generate_noise_image_pairs_
             laion_sdxl.py, Euler 50 steps with trailing spacing at guidance 8 and zero unconditional embeddings;
             here DDIM 50, the same first-order solver in the x/√ᾱ variables, at guidance 8), lr 1e-5, batch 4
             on each of 64 GPUs = 256, 2,000 iterations; no GAN, and the distribution-matching term at weight 0
             (``dmd.dm_weight``: still computed, its gradient scaled to zero)
  tiny       the same pipelines with a random-weight tiny SDXL pipeline (written under the workdir through the
             real converter), 8 built-in prompts, CPU-sized batches (the test suite)

  python -m dmd_jax.convert sdxl --src=stable-diffusion-xl-base-1.0/ --dst=teachers/sdxl
  python -m dmd_jax.main --config=configs/sdxl.py --workdir=runs/sdxl4 --config.teacher.path=teachers/sdxl \\
      --config.data.prompts_file=laion_prompts.txt --config.gan.real_data.data_dir=~/tensorflow_datasets
  python -m dmd_jax.main --config=configs/sdxl.py:steps1,ode ... --workdir=runs/sdxl_ode \\
      --config.regression.lpips_path=nets/lpips
  python -m dmd_jax.main --config=configs/sdxl.py:steps1 ... --workdir=runs/sdxl1 --config.init_from.workdir=runs/sdxl_ode
  python -m dmd_jax.main --config=configs/sdxl.py --workdir=runs/sdxl4 --mode=sample --prompt="a red bus" ...

Differences from the official runs, by necessity of data: the official prompts are LAION captions with
aesthetic score ≥ 6.25 and the critic's real images 500k LAION images (SDXL-VAE latents); here the prompts are
``data.prompts_file`` (or a tfds coco_captions split) and the real images are the COCO 2014 train images,
centre-cropped to 1024 px and VAE-encoded once (``gan.real_data``, ``data/real.py``). Evaluation: COCO-10k
(the DMD2 SDXL protocol: 10k val2014 captions and images, ``test_folder_sdxl.py --total_eval_samples 10000``)
FID under the clean-fid protocol at 512 px (centre crop, Lanczos to 512 — main/coco_eval/coco_evaluator.py with
``--eval_res 512`` — then clean-fid's resize to 299) and CLIP score (``evals.coco``).
"""
from dmd_jax.config_lib import coco_eval, cpu_sized, dmd2, evals, grid_eval, lora, parse_variants
from dmd_jax.families.sd.config import random_pipeline, sd_config


def get_config(arg: str = ""):
  v = parse_variants(arg, {"steps4", "lora", "steps1", "ode", "tiny"})
  tiny = "tiny" in v
  if "steps1" in v and ("steps4" in v or "lora" in v):
    raise ValueError("configs/sdxl.py: steps1 is the 1-step generator; steps4 and lora are 4-step (pick one)")
  if "ode" in v and "steps1" not in v:
    raise ValueError("configs/sdxl.py: 'ode' is the regression stage of the 1-step generator (use :steps1,ode)")
  c = sd_config(family="sdxl",
                guidance_scale=8.0,           # --real_guidance_scale 8 (--fake_guidance_scale 1)
                lr=5e-7, batch_size=128, num_train_steps=19_000,
                regression_weight=0.0, regression_batch_size=128,
                num_pairs=10_000, sampler_steps=50,                   # --num_ode_pairs 10000
                num_prompts=0)                                        # every prompt of data.prompts_file
  c.regression.sampler = "ddim"
  c.checkpoint_every = 500
  # the train state is 7 float32 copies of the 2.57B-parameter UNet (generator and fake score with AdamW's two
  # moments, the frozen teacher): 72 GB, so the parameters and optimiser states are sharded over groups of 8
  # devices (the official runs: FSDP HYBRID_SHARD within each 8-GPU node, main/sdxl/create_sdxl_fsdp_configs.py
  # --sharding_strategy 4), data parallel across the groups
  c.mesh.fsdp = 8
  # docs/method.md §8: COCO-10k FID (clean-fid protocol) and CLIP score (OpenCLIP ViT-g/14)
  c.evals = evals(grid=grid_eval(num_samples=4),
                  coco=coco_eval(num_samples=10_000, batch_size=64,
                                 image_size=512))        # test_folder_sdxl.py --eval_res 512
  # every variant's DMD2 terms: TTUR 5, GAN 5e-3 / 1e-2 on COCO train latents, warm-up over 64 processes
  dmd2(c, ttur=5, lr=5e-7, batch_size=128, num_train_steps=19_000, gan_generator=5e-3, gan_critic=1e-2,
       warmup_processes=64, source="coco_latents", dataset="coco_captions", num_images=82_783)
  if "steps1" in v:
    c.generator.timestep = 399                 # --conditioning_timestep 399
    c.num_train_steps = 24_000
    if "ode" in v:                             # regression only: LPIPS to the teacher's ODE pairs
      c.dmd.dm_weight = 0.0
      c.regression.weight = 1.0
      c.regression.batch_size = 256            # --ode_batch_size 4 × 64 GPUs
      c.gan.generator_weight = c.gan.critic_weight = 0.0
      c.dmd.fake_updates_per_generator_update = 1
      c.optim.lr = 1e-5
      c.num_train_steps = 2_000
  else:
    c.generator.steps = (999, 749, 499, 249)
  if "lora" in v:
    lora(c, rank=4 if tiny else 64)
    c.optim.lr = 5e-5
  if tiny:   # the test suite: a random-weight tiny SDXL pipeline written under the workdir, CPU sizes
    random_pipeline(c)
    c.mesh.fsdp = 1
    cpu_sized(c, batch_size=4, num_train_steps=4, checkpoint_every=100, log_every=1, warmup_steps=2,
              num_pairs=8, pair_shard_size=4, pair_sampler_steps=3)
    c.evals.coco.update(num_samples=8, batch_size=4, image_size=256)   # the 16 px images: no 512 blow-up
    c.gan.real_data.update(num_images=6, shard_size=3)  # the suite's prepared coco_captions train split has 7
  return c
