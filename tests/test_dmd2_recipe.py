"""DMD2 as the official code runs it (docs/method.md §6–7): the warm-up on the iteration clock, the GAN noise's
``max_timestep``, the metrics of the generator's terms, ``init_from`` another run's networks, and the recipes'
numbers in the configs (each cited in its config's docstring)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST, NO_EVALS_TOY, ROOT, TOY, run_main

from dmd_jax import checkpoint, dmd, families, train


def _toy(variant="dmd2", **overrides):
  from configs import toy2d
  c = toy2d.get_config(variant)
  c.generator.hidden = (32, 32)
  c.fake_score.hidden = (32, 32)
  c.fake_score.num_fourier = 8
  c.batch_size = 16
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  teacher, frozen = families.build(c, None)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  return c, train.build(c, teacher, frozen, mesh)


def _real_batch(n, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32) * 0.5
  return {"real_x": jnp.asarray(x), "real_cond": jnp.zeros((n,), jnp.int32)}


# ---------------------------------------------------------------------------------------------------------
# The warm-up: one iteration clock for both networks, accelerate's per-process scheduler steps.
# ---------------------------------------------------------------------------------------------------------

def test_schedule_is_diffusers_constant_with_warmup_on_the_iteration_clock():
  lr = dmd.learning_rate_schedule(2e-6, 500, warmup_processes=7)   # ImageNet-64: 500 scheduler steps, 7 GPUs
  # diffusers' constant_with_warmup at scheduler step s = 7 i: lr * s / 500 below 500, then lr
  for i in (0, 1, 10, 71, 72, 73, 1000):
    want = 2e-6 * min(1.0, 7 * i / 500)
    np.testing.assert_allclose(float(lr(i)), want, rtol=1e-6, atol=1e-14)
  assert float(lr(71)) < 2e-6 and float(lr(72)) == np.float32(2e-6)   # over after ceil(500 / 7) = 72 iterations
  cos = dmd.learning_rate_schedule(1.0, 10, "cosine", 110)
  np.testing.assert_allclose([float(cos(i)) for i in (5, 10, 60, 110)], [0.5, 1.0, 0.5, 0.0], atol=1e-6)
  assert float(dmd.learning_rate_schedule(3.0, 0)(0)) == 3.0
  with pytest.raises(ValueError, match="warmup_processes"):
    dmd.learning_rate_schedule(1.0, 10, warmup_processes=0)


def test_imagenet_recipe_warmup_is_over_after_72_iterations():
  from configs import imagenet64
  c = imagenet64.get_config("ttur")
  lr = dmd.learning_rate_schedule(c.optim.lr, c.optim.warmup_steps, c.optim.decay, c.num_train_steps,
                                  c.optim.warmup_processes)
  assert (c.optim.warmup_steps, c.optim.warmup_processes) == (500, 7)
  assert float(lr(36)) == pytest.approx(2e-6 * 36 * 7 / 500, rel=1e-6) and float(lr(72)) == pytest.approx(2e-6)


def test_generator_update_at_iteration_i_takes_the_lr_of_iteration_i():
  """TTUR 5, 10 warm-up iterations: the generator's updates at iterations 0, 5, 10, 15 are taken at lr(i) =
  lr · min(1, i / 10) — 0, lr / 2, lr, lr — not at the lr of its own update count (0, 1/10, 2/10, ...). With a
  constant gradient Adam's direction is ±1 per coordinate, so the parameter change is the learning rate."""
  config, run = _toy("dmd2", **{"dmd.fake_updates_per_generator_update": 5, "optim.warmup_steps": 10,
                                "optim.decay": "constant", "optim.lr": 1e-3, "optim.weight_decay": 0.0})
  hyper = run.hyper
  state = run.init_state()
  step = jax.jit(lambda s, b: dmd.train_step(s, run.frozen, b, jax.random.PRNGKey(3), teacher=run.teacher,
                                             hyper=hyper))
  logged = {}
  for i in range(16):
    state, m = step(state, _real_batch(16, i))
    logged[i] = (float(m["generator_lr"]), float(m["fake_lr"]))
  for i in range(16):
    g, f = logged[i]
    np.testing.assert_allclose(f, 1e-3 * min(1.0, i / 10), rtol=1e-6)
    np.testing.assert_allclose(g, 1e-3 * min(1.0, i / 10) if i % 5 == 0 else 0.0, rtol=1e-6)
  # the optimiser applies exactly that rate: constant gradients, Adam's direction ±1
  params = {"w": jnp.zeros((3,))}
  opt_state = hyper.generator_optimizer.init(params)
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  for i in (0, 5, 10):
    new, opt_state = dmd.apply_update(hyper.generator_optimizer, params, opt_state, grads, hyper.learning_rate(i))
    np.testing.assert_allclose(np.asarray(params["w"] - new["w"]), 1e-3 * min(1.0, i / 10) * np.sign(grads["w"]),
                               rtol=1e-4, atol=1e-12)
    params = new


# ---------------------------------------------------------------------------------------------------------
# The GAN's noise range and the generator's term-by-term metrics.
# ---------------------------------------------------------------------------------------------------------

def test_gan_max_timestep_bounds_the_critic_noise():
  config, run = _toy("dmd2")
  x_t, t = dmd.gan_noise(run.teacher, jnp.zeros((4096, 2)), jax.random.PRNGKey(0), max_timestep=100)
  t = np.asarray(t)
  assert t.min() == 0 and t.max() == 99 and len(np.unique(t)) == 100
  _, t1 = dmd.gan_noise(run.teacher, jnp.zeros((64, 2)), jax.random.PRNGKey(0), max_timestep=1)
  assert np.all(np.asarray(t1) == 0)   # the official code without --diffusion_gan
  assert run.hyper.gan_max_timestep == 1000 == config.gan.max_timestep
  for bad in (-1, 1001):
    with pytest.raises(ValueError, match="gan.max_timestep"):
      _toy("dmd2", **{"gan.max_timestep": bad})


def test_generator_metrics_name_what_they_measure():
  """``dm_grad_batch_norm`` = ||grad|| over the batch (the official dmtrain_gradient_norm) = sqrt(B) ×
  ``dm_grad_sample_rms``; the output gradients are the weighted terms' d/dx, and the DM one is
  ``dm_weight · grad / numel(x)``."""
  config, run = _toy("dmd2")
  hyper, nets = run.hyper, run.teacher
  state = run.init_state()
  # a fake score that is not the teacher (else the DM gradient is exactly 0)
  fake = jax.tree.map(lambda a: a * 1.1, state["fake_score"]["params"])
  z = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  cond = jnp.zeros((16,), jnp.int32)
  _, x, m = dmd.generator_update(state["generator"], nets, hyper, run.frozen, fake, z, cond, {},
                                 jax.random.PRNGKey(2), 600)
  m = {k: float(v) for k, v in m.items()}
  assert m["dm_grad_batch_norm"] == pytest.approx(4.0 * m["dm_grad_sample_rms"], rel=1e-5)
  assert m["dm_output_grad_norm"] == pytest.approx(hyper.dm_weight * m["dm_grad_batch_norm"] / x.size, rel=1e-5)
  g_gan = jax.grad(lambda x: dmd.gan_generator_loss(nets, {"score": fake["score"], "head": fake["head"]}, x, cond,
                                                    jax.random.fold_in(jax.random.PRNGKey(2), 2), 1000))(x)
  assert m["gan_output_grad_norm"] == pytest.approx(hyper.gan_generator_weight * float(jnp.linalg.norm(g_gan)),
                                                    rel=1e-4)
  assert m["gan_dm_grad_ratio"] == pytest.approx(m["gan_output_grad_norm"] / m["dm_output_grad_norm"], rel=1e-5)
  assert m["generator_lr"] == pytest.approx(float(hyper.learning_rate(600)))


def test_train_metrics_reach_metrics_json_and_tensorboard(tmp_path):
  run_main(f"--workdir={tmp_path}", *FAST, "--config.num_train_steps=20", *NO_EVALS_TOY,
           "--config.dmd.fake_updates_per_generator_update=5", config=TOY + ":dmd2")
  m = json.load(open(tmp_path / "metrics.json"))
  got = m["train_metrics"]
  for k in ("generator_lr", "fake_lr", "dm_grad_batch_norm", "dm_grad_sample_rms", "dm_output_grad_norm",
            "gan_output_grad_norm", "gan_dm_grad_ratio", "skipped_steps"):
    assert k in got, k
  assert got["step"] == 20 and got["skipped_steps"] == 0 and got["gan_output_grad_norm"] > 0
  assert m["generator_updates"] == 4
  from tensorboardX.proto import event_pb2
  from test_io import _records
  tags = {v.tag for n in os.listdir(tmp_path) if "tfevents" in n
          for r in _records((tmp_path / n).read_bytes()) for v in event_pb2.Event.FromString(r).summary.value}
  assert {"generator_lr", "fake_lr", "gan_dm_grad_ratio", "skipped_steps"} <= tags, tags


# ---------------------------------------------------------------------------------------------------------
# init_from: a new run from another run's networks (the official --ckpt_only_path).
# ---------------------------------------------------------------------------------------------------------

def _restore_all(workdir, run):
  ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
  step = ckpt.latest_step()
  state, meta = ckpt.restore(step, checkpoint.abstract_with_shardings(run.abstract_state, run.state_sharding))
  return state


def test_init_from_takes_the_networks_and_restarts_optimisers(tmp_path):
  """A TTUR run without GAN, then a GAN stage initialised from it in a new workdir: the generator and fake
  score parameters are the first run's, the head is new, the optimiser states and the step restart at 0; the
  stage then resumes its own checkpoints; resuming a GAN config in the GAN-less workdir is a clear error."""
  a, b = tmp_path / "a", tmp_path / "b"
  args = [*FAST, *NO_EVALS_TOY, "--config.checkpoint_every=4"]
  run_main(f"--workdir={a}", *args, "--config.num_train_steps=4", "--config.gan.generator_weight=0",
           "--config.gan.critic_weight=0", config=TOY + ":dmd2")
  p = run_main(f"--workdir={b}", *args, "--config.num_train_steps=1", f"--config.init_from.workdir={a}",
               config=TOY + ":dmd2")
  assert f"initialised from checkpoint 4 of {a}" in p.stderr and "a new GAN head" in p.stderr
  assert json.load(open(b / "metrics.json"))["steps"] == 1
  p = run_main(f"--workdir={b}", *args, "--config.num_train_steps=2", f"--config.init_from.workdir={a}",
               config=TOY + ":dmd2")
  assert "resumed from" in p.stderr and "at step 1" in p.stderr and "initialised from" not in p.stderr
  p = run_main(f"--workdir={a}", *args, "--config.num_train_steps=8", check=False, config=TOY + ":dmd2")
  assert p.returncode != 0 and "without DMD2's GAN critic head" in p.stderr and "init_from.workdir" in p.stderr
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    config, run = _toy("dmd2")
    train.init_from_run(run, str(tmp_path / "nothing"))


def test_init_from_state_in_process(tmp_path):
  config, run = _toy("dmd2", **{"gan.generator_weight": 0.0, "gan.critic_weight": 0.0})
  state = run.init_state()
  step = jax.jit(lambda s, b: dmd.train_step(s, run.frozen, b, jax.random.PRNGKey(3), teacher=run.teacher,
                                             hyper=run.hyper))
  for i in range(3):
    state, _ = step(state, _real_batch(16, i))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "a"))
  ckpt.save(3, state, {"config": config.to_json_best_effort()})
  ckpt.wait()
  ckpt.close()
  config2, run2 = _toy("dmd2")
  new = train.init_from_run(run2, str(tmp_path / "a"))
  assert int(new["step"]) == 0
  for x, y in zip(jax.tree.leaves(new["generator"]["params"]), jax.tree.leaves(state["generator"]["params"])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(new["fake_score"]["params"]["score"]),
                  jax.tree.leaves(state["fake_score"]["params"])):
    np.testing.assert_array_equal(x, y)
  fresh = run2.init_state()
  for x, y in zip(jax.tree.leaves(new["fake_score"]["params"]["head"]), jax.tree.leaves(fresh["fake_score"]["params"]["head"])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(new["generator"]["opt_state"]), jax.tree.leaves(fresh["generator"]["opt_state"])):
    np.testing.assert_array_equal(x, y)   # Adam's moments and count at zero


# ---------------------------------------------------------------------------------------------------------
# The recipes' numbers (configs/*.py docstrings cite the official scripts and model zoos).
# ---------------------------------------------------------------------------------------------------------

def test_imagenet64_recipes_are_the_model_zoos():
  from configs import imagenet64
  ttur, gan, stage2 = (imagenet64.get_config(v) for v in ("ttur", "dmd2", "dmd2,stage2"))
  for c in (ttur, gan, stage2):
    assert c.regression.weight == 0 and c.dmd.fake_updates_per_generator_update == 5 and c.batch_size == 280
    assert (c.optim.warmup_steps, c.optim.warmup_processes) == (500, 7) and c.gan.max_timestep == 1000
  assert (ttur.num_train_steps, ttur.optim.lr, ttur.gan.generator_weight) == (405_500, 2e-6, 0.0)
  assert (gan.num_train_steps, gan.optim.lr, gan.gan.generator_weight, gan.gan.critic_weight) == (
      193_500, 2e-6, 3e-3, 1e-2)
  assert (stage2.num_train_steps, stage2.optim.lr, stage2.gan.generator_weight) == (142_500, 5e-7, 3e-3)
  with pytest.raises(ValueError, match="pick one"):
    imagenet64.get_config("ttur,dmd2")


def test_sd15_stages_are_the_official_scripts():
  from configs import coco
  s1, s2 = coco.get_config("dmd2"), coco.get_config("dmd2,stage2")
  for c in (s1, s2):
    assert c.guidance_scale == 1.75 and c.dmd.fake_updates_per_generator_update == 10 and c.batch_size == 2048
    assert (c.optim.warmup_steps, c.optim.warmup_processes) == (500, 64) and c.regression.weight == 0
  assert (s1.num_train_steps, s1.optim.lr, s1.gan.generator_weight) == (39_000, 1e-5, 0.0)
  assert (s2.num_train_steps, s2.optim.lr, s2.gan.generator_weight, s2.gan.critic_weight, s2.gan.max_timestep) == (
      2_000, 5e-7, 1e-3, 1e-2, 1000)
