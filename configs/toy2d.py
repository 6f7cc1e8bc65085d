"""The embedded default: DMD on a 2-D mixture of Gaussians with an analytic teacher.

The teacher is the exact EDM denoiser E[x0 | x0 + sigma eps = x] of the mixture, so nothing is downloaded
and the whole method — DM gradient, fake-score training, regression on teacher Heun-ODE pairs — runs on a
laptop CPU in a few minutes. Generator and fake score are MLPs from random weights (docs/method.md §2).

Variants (``--config=configs/toy2d.py:VARIANT``):
  default   8 equal modes on the unit circle, std 0.05
  unequal   the same modes with weights ∝ 1..8
  grid25    a 5×5 grid, spacing 0.5, std 0.02 (hard at this budget: a report, not a gate)
  dmd2      (with any of the above, e.g. ``:dmd2`` or ``:unequal,dmd2``) DMD2: no regression pairs, the GAN
            critic on the fake score's last hidden layer against draws from the true mixture
  steps4    (with dmd2: ``:dmd2,steps4``) DMD2's four-step generator with backward simulation at the toy's
            timesteps 999, 300, 200, 150 (sigma 80, 0.32, 0.085, 0.040): the first step is the one-step MLP of
            z, the later ones the teacher's denoiser plus a trained residual that starts at zero (docs/toy.md: why
            these timesteps and not the image recipes' 999, 749, 499, 249)
"""
import ml_collections

from dmd_jax.config_lib import evals, gan_config, init_from_config, optim_config, toy_eval
from dmd_jax.data.toy import circle_means, grid_means


def get_config(arg: str = ""):
  names = [a for a in (arg or "").split(",") if a]
  dmd2, steps4 = "dmd2" in names, "steps4" in names
  names = [a for a in names if a not in ("dmd2", "steps4")]
  if len(names) > 1:
    raise ValueError(f"toy2d takes one mixture variant (default, unequal, grid25) plus optionally dmd2 and "
                     f"steps4, got {arg!r}")
  if steps4 and not dmd2:
    raise ValueError(f"toy2d: steps4 is a DMD2 variant (a multi-step generator without regression pairs): "
                     f"use dmd2,steps4, got {arg!r}")
  variant = names[0] if names else "default"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_train_steps = 12_000          # ~1 min on a 2-core AVX-512 CPU (docs/benchmarks.md)
  c.batch_size = 512                  # generator / fake-score batch per iteration (global)
  c.checkpoint_every = 4_000
  c.log_every = 2_000
  c.distributed = "auto"              # 'auto' (from the environment), 'yes', 'no': jax.distributed
  c.compilation_cache = "auto"        # 'auto' = <workdir>/compilation_cache, a path (gs:// too), '' = off

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.min_shard_size = 2 ** 18     # arrays smaller than this are replicated, larger ones FSDP-sharded

  c.model = ml_collections.ConfigDict()
  c.model.family = "toy"

  c.toy = ml_collections.ConfigDict()
  if variant == "default":
    c.toy.weights = (1.0,) * 8
    c.toy.means = circle_means(8)
    c.toy.std = 0.05
  elif variant == "unequal":
    c.toy.weights = tuple(float(k) for k in range(1, 9))
    c.toy.means = circle_means(8)
    c.toy.std = 0.05
  elif variant == "grid25":
    c.toy.weights = (1.0,) * 25
    c.toy.means = grid_means(5, 0.5)
    c.toy.std = 0.02
  else:
    raise ValueError(f"unknown toy2d variant {variant!r}; expected default, unequal or grid25")

  c.schedule = ml_collections.ConfigDict(dict(
      kind="edm", sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5,
      num_timesteps=1000, dm_t_min=20, dm_t_max=980))

  c.generator = ml_collections.ConfigDict(dict(
      hidden=(128, 128, 128),
      steps=()))            # DMD2 multi-step: Karras-table timesteps t_0 = 999 > t_1 > ...; () = one step
                            # (several steps: the later ones are the teacher's denoiser + a residual MLP)
  c.fake_score = ml_collections.ConfigDict(dict(hidden=(128, 128, 128), num_fourier=64, fourier_scale=2.0))

  c.dmd = ml_collections.ConfigDict(dict(
      dm_weight=1.0,
      fake_updates_per_generator_update=1))   # 1 = DMD; 5 = DMD2's two time-scale rule

  c.regression = ml_collections.ConfigDict(dict(
      weight=0.25,          # lambda_reg; 0 turns the regression loss (and the pairs) off
      distance="l2",        # per-sample distance: 'l2' (Euclidean) or 'mse'
      num_pairs=20_000,
      shard_size=10_000,
      batch_size=256,
      sampler_steps=18))    # teacher EDM Heun steps per pair (35 NFE)

  c.optim = optim_config(lr=1e-3, decay="cosine")   # cosine to zero (the papers' image recipes: constant)
  c.gan = gan_config(source="mixture")   # DMD2's GAN terms, off unless :dmd2 (weights 0)
  c.init_from = init_from_config()

  c.ema = ml_collections.ConfigDict(dict(decay=0.0))   # EMA of the generator; 0 = off

  c.evals = evals(toy=toy_eval(num_samples=20_000))   # TV, precision, mode shares, MMD², a scatter PNG
  if dmd2:
    # DMD2 (docs/method.md §7): no regression pairs, GAN on real mixture draws (generator 3e-2, critic 1e-2).
    # The two time-scale rule stays at 1 here: at this budget 5 fake-score updates per generator update leave
    # the generator with 2.4k updates, which the toy does not make up for (docs/toy.md: the ablation).
    c.regression.weight = 0.0
    c.dmd.fake_updates_per_generator_update = 1
    c.gan.generator_weight = 3e-2
    c.gan.critic_weight = 1e-2
  if steps4:
    # Re-noising a 2-D sample at the image recipes' sigma 17.5 / 2.5 erases which mode it was on, and the
    # steps then split the modes among themselves (the fake score models the mixture over steps; docs/toy.md)
    c.generator.steps = (999, 300, 200, 150)
  return c
