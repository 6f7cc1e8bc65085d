"""Can DMD2's critic separate real digits from a fixed generator's? The fake-score step (denoising loss + critic
term, one AdamW, global-norm clipping) runs alone for ``--steps`` iterations against a **frozen** generator, and
the critic's logit gap on the training batches (mean logit on real minus on generated), its loss, the median
of the fake score's gradient norm before clipping and the fraction of steps clipped (each over the last
``--window`` steps) are printed every ``--every``
steps, so the critic's learning is seen apart from the generator's.

    python bench/digits_critic.py --teacher=runs/digits/teacher/teacher [--generator_from=RUN] \\
        [--steps=600] [-- --config.optim.clip_norm=1e9 --config.gan.critic_weight=1 ...]

``--generator_from`` takes the generator (and fake score, and head where it has one) of another run's latest
checkpoint (``init_from``); without it the generator is the teacher at init (one Euler step from σ = 80:
blurry digits, easy to tell from real ones). Arguments after ``--`` are config overrides of
``configs/digits.py:dmd2``. Writes ``OUT/critic_probe.json`` (the printed rows).
"""
import argparse
import ast
import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import digits as digits_config  # noqa: E402
from dmd_jax import dmd, streams, train  # noqa: E402
from dmd_jax.data.real import make_real_data  # noqa: E402


def apply_overrides(config, overrides):
  """``--config.a.b=VALUE`` flags onto ``config`` (VALUE a Python literal), type-checked by ``ConfigDict``."""
  config.update_from_flattened_dict({o.removeprefix("--config.").split("=", 1)[0]: ast.literal_eval(o.split("=", 1)[1])
                                     for o in overrides})
  return config


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--teacher", required=True)
  ap.add_argument("--generator_from", default="")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--every", type=int, default=50)
  ap.add_argument("--window", type=int, default=50)
  ap.add_argument("--out", default="runs/digits_critic")
  ap.add_argument("overrides", nargs="*")
  a = ap.parse_args()
  logging.set_verbosity(logging.WARNING)
  config = digits_config.get_config("dmd2")
  config.teacher.path = a.teacher
  apply_overrides(config, a.overrides)
  os.makedirs(a.out, exist_ok=True)
  run = train.setup(config, a.out)
  state = train.init_from_run(run, a.generator_from) if a.generator_from else run.init_state()
  real = make_real_data(run, config.gan.real_data)
  batch_for = train.batches(run, None, real)
  gen_params = run.generator_params(state["generator"])
  fake_state = state["fake_score"]
  teacher, hyper = run.teacher, run.hyper
  example = batch_for(0)
  fake_step = run.jit_fake_step(example)
  key = streams.key(config.seed, "train")

  @jax.jit
  def generate(params, step):
    rng = jax.random.fold_in(key, step)
    r_z, r_c, r_gen, r_fake = jax.random.split(rng, 4)
    z = teacher.sample_noise(r_z, hyper.batch_size)
    cond = teacher.conditions.draw(r_c, hyper.batch_size)
    x, _ = dmd.generator_forward(teacher, hyper.generator_steps, params, z, cond, r_gen)
    return x, cond, r_fake

  rows, gaps, losses, norms, t0 = [], [], [], [], time.time()
  for step in range(a.steps):
    batch = batch_for(step)
    x, cond, r_fake = generate(gen_params, step)
    fake_state, m = fake_step(fake_state, run.frozen, x, cond, batch, r_fake, step)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    gaps.append(m["critic_logit_real"] - m["critic_logit_fake"])
    losses.append(m["gan_critic_loss"])
    norms.append(m["fake_score_grad_norm"])
    if (step + 1) % a.every == 0:
      row = {"step": step + 1, "logit_gap": float(np.mean(gaps[-a.window:])),
             "critic_loss": float(np.mean(losses[-a.window:])),
             "grad_norm_median": float(np.median(norms[-a.window:])),
             "clipped": float(np.mean(np.asarray(norms[-a.window:]) > config.optim.clip_norm)),
             "fake_lr": m["fake_lr"], "seconds": round(time.time() - t0, 1)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  json.dump({"overrides": a.overrides, "generator_from": a.generator_from, "rows": rows},
            open(os.path.join(a.out, "critic_probe.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
