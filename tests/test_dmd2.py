"""DMD2 (docs/method.md §7): the GAN head against a PyTorch twin of the official head, the GAN gradients,
multi-step sampling and backward simulation, non-finite steps, and the toy ``:dmd2`` run as a user runs it."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import FAST, ROOT, run_main
from fixture_testing import rel_err

from dmd_jax import dmd, families, train
from dmd_jax.models.gan_head import ConvGANHead, head_groups

TOY = os.path.join(ROOT, "configs", "toy2d.py")


# ---------------------------------------------------------------------------------------------------------
# The head.
# ---------------------------------------------------------------------------------------------------------

def _torch_head(c: int, k2: int = 4):
  """The official head (``nn.Sequential`` of DMD2's EDM / SD guidance models); ``k2`` the second conv's
  kernel and stride (4 in the official head; our rule for smaller bottlenecks: min(4, side)); the official 32
  groups from 128 channels up, fewer below (at least 4 channels a group: ``gan_head.head_groups``)."""
  nn = torch.nn
  g = head_groups(c)
  return nn.Sequential(nn.Conv2d(c, c, 4, 2, 1), nn.GroupNorm(g, c), nn.SiLU(),
                       nn.Conv2d(c, c, k2, k2, 0), nn.GroupNorm(g, c), nn.SiLU(),
                       nn.Conv2d(c, 1, 1, 1, 0))


def _params_from_torch(head) -> dict:
  conv = lambda m: {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
                    "bias": jnp.asarray(m.bias.detach().numpy())}
  norm = lambda m: {"scale": jnp.asarray(m.weight.detach().numpy()), "bias": jnp.asarray(m.bias.detach().numpy())}
  return {"conv0": conv(head[0]), "norm1": norm(head[1]), "conv3": conv(head[3]), "norm4": norm(head[4]),
          "conv6": conv(head[6])}


# ImageNet-64's 768×8×8, SD 1.5's 1280×8×8, coco:tiny's 32×4×4
@pytest.mark.parametrize("c,side,k2", [(768, 8, 4), (1280, 8, 4), (32, 4, 2)])
def test_conv_head_matches_torch(c, side, k2):
  torch.manual_seed(0)
  head = _torch_head(c, k2)
  with torch.no_grad():     # non-trivial GroupNorm affine parameters
    for m in (head[1], head[4]):
      m.weight.normal_(1.0, 0.2)
      m.bias.normal_(0.0, 0.2)
  feats = np.random.default_rng(0).normal(size=(3, side, side, c)).astype(np.float32)
  with torch.no_grad():
    ref = head(torch.from_numpy(feats.transpose(0, 3, 1, 2))).numpy().reshape(3)
  ours = ConvGANHead().apply({"params": _params_from_torch(head)}, jnp.asarray(feats))
  err = rel_err(ours, ref)
  print(f"\nGAN head {c}x{side}x{side}: rel err {err:.2e}")
  assert ours.shape == (3,) and ours.dtype == jnp.float32
  assert err <= 1e-5


def test_head_groups_keep_the_official_head_and_four_channels_a_group():
  assert head_groups(1280) == head_groups(768) == head_groups(256) == head_groups(128) == 32   # official
  assert [head_groups(c) for c in (64, 32, 16, 8, 4, 2)] == [16, 8, 4, 2, 1, 1]
  assert head_groups(24) == 6 and head_groups(20) == 5 and head_groups(14) == 2   # divisors of C


def _saturation(c: int, groups: int, n: int = 512):
  """The head at init with ``groups`` groups on the digits' bottleneck shape (``c`` × 4 × 4, random features):
  the fraction of the second GroupNorm's outputs beyond ±0.99, and the share of the summed squared per-sample
  gradient ``|dD/dfeatures|²`` that the top 5 % of samples carry."""
  head = ConvGANHead(groups=groups)
  feats = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 4, c))
  params = head.init(jax.random.PRNGKey(1), feats[:1])["params"]
  _, inter = head.apply({"params": params}, feats, mutable=["intermediates"])
  normed = np.asarray(inter["intermediates"]["norm4_out"][0])
  saturated = float(np.mean(np.abs(normed) > 0.99))
  g = jax.vmap(jax.grad(lambda f: head.apply({"params": params}, f[None])[0]))(feats)
  sq = np.sort(np.asarray(jnp.sum(g.reshape(n, -1) ** 2, axis=1)))[::-1]
  return saturated, float(sq[: n // 20].sum() / sq.sum())


def test_narrow_head_does_not_saturate():
  """The digits' 32-channel bottleneck: the official 16 groups of 2 channels saturate the second GroupNorm
  (every value ±1) and a few samples carry most of the GAN gradient; ``head_groups``' 8 groups of 4 do not."""
  sat2, top2 = _saturation(32, 16)
  sat4, top4 = _saturation(32, head_groups(32))
  print(f"\nsaturated (|v| > 0.99): 2 a group {sat2:.3f}, 4 a group {sat4:.3f}; gradient share of the top 5 %: "
        f"{top2:.3f}, {top4:.3f}")
  assert head_groups(32) == 8
  assert sat2 > 0.9 and sat4 < 0.5
  assert top2 > 0.6 and top4 < 0.4


def test_head_init_is_pytorch_default():
  """Weights and biases uniform in ±1/sqrt(fan_in) (PyTorch's kaiming-uniform with a = sqrt(5)); GroupNorm 1 / 0."""
  c = 256
  p = ConvGANHead().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, c)))["params"]
  torch.manual_seed(0)
  t = _torch_head(c)
  for name, tm in (("conv0", t[0]), ("conv3", t[3]), ("conv6", t[6])):
    fan_in = tm.weight[0].numel()
    bound = 1 / np.sqrt(fan_in)
    w, b = np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"])
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    np.testing.assert_allclose(w.std(), tm.weight.detach().numpy().std(), rtol=0.05)
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05)
  assert np.all(np.asarray(p["norm1"]["scale"]) == 1) and np.all(np.asarray(p["norm4"]["bias"]) == 0)


# ---------------------------------------------------------------------------------------------------------
# The method on the toy teacher.
# ---------------------------------------------------------------------------------------------------------

def _toy(variant="dmd2", mesh_devices=1, **overrides):
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
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:mesh_devices]).reshape(mesh_devices, 1), ("data", "fsdp"))
  run = train.build(c, teacher, frozen, mesh)
  return c, run


def _real_batch(n, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32) * 0.5
  return {"real_x": jnp.asarray(x), "real_cond": jnp.zeros((n,), jnp.int32)}


def test_gan_generator_gradient_flows_through_the_fake_network():
  config, run = _toy()
  nets, hyper = run.teacher, run.hyper
  state = run.init_state()
  fake = state["fake_score"]["params"]
  assert set(fake) == {"score", "head"}
  z = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  cond = jnp.zeros((16,), jnp.int32)
  gen = state["generator"]["params"]
  gan = lambda p, critic: dmd.gan_generator_loss(nets, critic, nets.generate(p, z, cond), cond,
                                                 jax.random.PRNGKey(2))
  g = jax.grad(gan)(gen, fake)
  norm = float(dmd.optax.tree.norm(g))
  assert norm > 1e-4
  # through the head and the fake network's features: a head with zero weights passes no gradient
  zero_head = jax.tree.map(jnp.zeros_like, fake["head"])
  assert float(dmd.optax.tree.norm(jax.grad(gan)(gen, {**fake, "head": zero_head}))) == 0.0
  # ... and other fake-network parameters (same head) change the gradient
  other = {**fake, "score": jax.tree.map(lambda a: a * 1.5, fake["score"])}
  assert rel_err(jax.tree.leaves(jax.grad(gan)(gen, other))[0], jax.tree.leaves(g)[0]) > 1e-3
  # the generator step does not touch the fake score: one full iteration with the fake score's optimiser off
  frozen_fake = dataclasses.replace(hyper, generator_optimizer=dmd.optax.sgd(1e-2),
                                    fake_score_optimizer=dmd.optax.set_to_zero(), learning_rate=lambda i: 1.0)
  state = train.init_state(nets, frozen_fake, jax.random.PRNGKey(0), run.frozen)
  fake, gen = state["fake_score"]["params"], state["generator"]["params"]
  new, metrics = jax.jit(lambda s, b: dmd.train_step(s, run.frozen, b, jax.random.PRNGKey(3), teacher=nets,
                                                     hyper=frozen_fake))(state, _real_batch(16))
  assert float(metrics["gan_generator_loss"]) > 0 and float(metrics["generator_grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(new["fake_score"]["params"]), jax.tree.leaves(fake)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["generator"]["params"]),
                                                      jax.tree.leaves(gen)))


def test_gan_critic_loss_is_the_non_saturating_loss():
  config, run = _toy()
  nets = run.teacher
  critic = run.init_state()["fake_score"]["params"]
  fake_x = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  real = _real_batch(16)
  cond = jnp.zeros((16,), jnp.int32)
  rng = jax.random.PRNGKey(5)
  loss, m = dmd.gan_critic_loss(nets, critic, fake_x, cond, real["real_x"], cond, rng)
  d = dmd.critic_logits(nets, critic, jnp.concatenate([fake_x, real["real_x"]]), jnp.concatenate([cond, cond]), rng)
  d_fake, d_real = d[:16], d[16:]
  want = np.mean(np.log1p(np.exp(np.asarray(d_fake, np.float64)))) + np.mean(
      np.log1p(np.exp(-np.asarray(d_real, np.float64))))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  # each sample its own t over the whole range [0, 999]
  x_t, t = dmd.gan_noise(nets, jnp.zeros((4096, 2)), rng)
  t = np.asarray(t)
  assert t.min() < 10 and t.max() > 989 and len(np.unique(t)) > 900


def test_multistep_sampling_equals_the_hand_written_loop():
  steps = (999, 700, 400, 150)
  config, run = _toy(**{"generator.steps": steps})
  nets = run.teacher
  params = run.init_state()["generator"]["params"]
  n = 8
  z = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  cond = jnp.zeros((n,), jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  got = np.asarray(jax.jit(run.sample)(params, z, cond, keys))
  # by hand: predict x0 from pure noise, then re-noise to t_j with fresh noise and predict again
  x = nets.generate(params, z, cond)
  for j, t in enumerate(steps[1:], start=1):
    eps = jnp.stack([jax.random.normal(jax.random.fold_in(k, j), (2,)) for k in keys])
    sigma = nets.schedule.sigma(t)
    x = nets.generate_at(params, x + sigma * eps, jnp.full((n,), t), cond)
  np.testing.assert_allclose(got, np.asarray(x), rtol=1e-5, atol=1e-6)
  assert run.generator_nfe == 4
  # a sample does not depend on the others of its batch
  half = np.asarray(jax.jit(run.sample)(params, z[:4], cond[:4], keys[:4]))
  np.testing.assert_allclose(half, got[:4], rtol=1e-5, atol=1e-6)


def test_backward_simulation_trains_at_the_drawn_step():
  steps = (999, 500)
  config, run = _toy(**{"generator.steps": steps})
  nets = run.teacher
  params = run.init_state()["generator"]["params"]
  z = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  cond = jnp.zeros((16,), jnp.int32)
  seen = set()
  for i in range(12):
    rng = jax.random.PRNGKey(100 + i)
    x, k = dmd.generator_forward(nets, steps, params, z, cond, rng)
    r_k, r_z, r_sim = jax.random.split(rng, 3)
    assert int(k) == int(jax.random.randint(r_k, (), 0, len(steps)))
    if int(k) == 0:
      want = nets.generate(params, z, cond)
    else:   # fresh pure noise through step 0, re-noised to t_1 with the training noise z
      x0 = nets.generate(params, jax.random.normal(r_z, z.shape), cond)
      t = jnp.full((16,), steps[1])
      want = nets.generate_at(params, nets.schedule.add_noise(x0, z, t), t, cond)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-5, atol=1e-6)
    seen.add(int(k))
  assert seen == {0, 1}
  # the gradient reaches the generator only through the last step
  g = jax.grad(lambda p: jnp.sum(dmd.generator_forward(nets, steps, p, z, cond, jax.random.PRNGKey(101))[0]))(params)
  assert float(dmd.optax.tree.norm(g)) > 0


def test_one_step_toy_generator_rejects_generate_at():
  config, run = _toy("default")
  params = run.init_state()["generator"]["params"]
  with pytest.raises(ValueError, match="generator.steps"):
    run.teacher.generate_at(params, jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))


def test_multistep_toy_generator_starts_as_the_teacher():
  """``:dmd2,steps4``: the first step is the one-step MLP of z; the later steps start as the teacher's exact
  mixture denoiser (the residual's output layer is zero), as DMD2's generators start as teacher copies."""
  config, run = _toy("dmd2,steps4")
  assert tuple(config.generator.steps) == (999, 300, 200, 150)
  nets = run.teacher
  params = run.init_state()["generator"]["params"]
  assert set(params) == {"first", "refine"}
  x_t = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  for t in config.generator.steps[1:]:
    tt = jnp.full((64,), t)
    got = nets.generate_at(params, x_t, tt, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(nets.real_denoise(None, x_t, tt, None)))
  z = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  one_step = _toy("dmd2")[1].teacher
  np.testing.assert_array_equal(np.asarray(nets.generate(params, z, None)),
                                np.asarray(one_step.generate(params["first"], z, None)))
  assert float(jnp.std(nets.generate(params, z, None))) > 0.05     # spread from the start, not one point
  with pytest.raises(ValueError, match="steps4 is a DMD2 variant"):
    _toy("steps4")


def test_generator_steps_are_checked():
  for bad in [(500, 200), (999, 999), (999, 1200), (999, 300, 400)]:
    with pytest.raises(ValueError, match="generator.steps"):
      _toy(**{"generator.steps": bad})


def test_non_finite_step_is_skipped_and_counted():
  config, run = _toy()
  nets, hyper = run.teacher, run.hyper
  state = run.init_state()
  step = jax.jit(lambda s, b, k: dmd.train_step(s, run.frozen, b, k, teacher=nets, hyper=hyper))
  bad = _real_batch(16)
  bad["real_x"] = bad["real_x"].at[3, 0].set(jnp.nan)
  key = jax.random.PRNGKey(0)
  s1, m1 = step(state, bad, key)
  assert int(s1["step"]) == 1 and int(m1["skipped_steps"]) == 1 and int(m1["consecutive_skips"]) == 1
  assert not np.isfinite(float(m1["fake_score_grad_norm"]))
  for a, b in zip(jax.tree.leaves({k: state[k] for k in ("generator", "fake_score")}),
                  jax.tree.leaves({k: s1[k] for k in ("generator", "fake_score")})):
    np.testing.assert_array_equal(a, b)
  s2, m2 = step(s1, bad, key)
  assert int(m2["consecutive_skips"]) == 2
  s3, m3 = step(s2, _real_batch(16), key)
  assert int(m3["skipped_steps"]) == 2 and int(m3["consecutive_skips"]) == 0
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(s3))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s3["fake_score"]), jax.tree.leaves(s2["fake_score"])))


def test_trainer_stops_after_consecutive_skips(tmp_path):
  """A run whose real data turns to NaN from step 6 on skips every step after it and stops with a clear error
  after optim.max_consecutive_skips in a row; its last checkpoint holds the parameters of step 6 (= a clean
  6-step run's)."""
  script = """
import numpy as np
from dmd_jax.data import real
orig = real.make_real_data
class Poisoned:
  def __init__(self, inner): self.inner = inner
  def batch(self, step, b, rows):
    out = self.inner.batch(step, b, rows)
    if step >= 6: out['real_x'] = out['real_x'] * np.nan
    return out
  def state(self): return self.inner.state()
  def restore(self, s): return self.inner.restore(s)
real.make_real_data = lambda run, cfg: Poisoned(orig(run, cfg))
from absl import app
from dmd_jax import main
app.run(main.main)
"""
  args = [*FAST, "--config.checkpoint_every=2", "--config.optim.max_consecutive_skips=5"]
  bad, clean = tmp_path / "bad", tmp_path / "clean"
  p = run_main(f"--workdir={bad}", *args, "--config.num_train_steps=200", check=False, config=TOY + ":dmd2",
               script=script)
  assert p.returncode != 0
  assert "5 consecutive train steps had non-finite gradients" in p.stderr, p.stderr[-3000:]
  saved = sorted(int(d.name) for d in (bad / "checkpoints").iterdir() if d.name.isdigit())
  assert saved[-1] >= 10, saved
  run_main(f"--workdir={clean}", *args, "--config.num_train_steps=6", config=TOY + ":dmd2")
  outs = []
  for d in (bad, clean):
    run_main(f"--workdir={d}", "--mode=sample", "--num_samples=64", f"--output={d}/s.npz", *args,
             config=TOY + ":dmd2")
    outs.append(np.load(d / "s.npz")["samples"])
  assert np.all(np.isfinite(outs[0]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_toy_dmd2_train_resume_sample_eval(tmp_path):
  """``configs/toy2d.py:dmd2`` as a user runs it: train, then a longer run resumed from its checkpoint equals an
  uninterrupted one (the real-data state in the checkpoint), then sample and eval."""
  args = [*FAST, "--config.checkpoint_every=20", "--config.generator.steps=(999,500)"]
  full, part = tmp_path / "full", tmp_path / "part"
  run_main(f"--workdir={full}", *args, "--config.num_train_steps=40", config=TOY + ":dmd2")
  run_main(f"--workdir={part}", *args, "--config.num_train_steps=20", config=TOY + ":dmd2")
  run_main(f"--workdir={part}", *args, "--config.num_train_steps=40", config=TOY + ":dmd2")
  outs = []
  for d in (full, part):
    run_main(f"--workdir={d}", "--mode=sample", "--num_samples=64", f"--output={d}/s.npz", *args,
             config=TOY + ":dmd2")
    outs.append(np.load(d / "s.npz"))
  np.testing.assert_array_equal(outs[0]["samples"], outs[1]["samples"])
  assert int(outs[0]["nfe"]) == 2
  m = json.load(open(full / "metrics.json"))
  assert m["generator_nfe"] == 2 and m["steps"] == 40
  p = run_main(f"--workdir={part}", "--mode=eval", *args, config=TOY + ":dmd2")
  assert '"precision"' in p.stdout


def test_backward_simulation_on_8_devices_matches_one(tmp_path):
  """The multi-step toy :dmd2 step sharded over 8 emulated devices (batch split 8 ways) draws the same k as on
  one device and computes the same update (to float rounding), step after step."""
  script = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, 'tests')
from test_dmd2 import _toy, _real_batch
from dmd_jax import dmd, sharding, streams
assert len(jax.devices()) == 8
out = {}
for n_dev in (1, 8):
  config, run = _toy(**{"generator.steps": (999, 600, 300), "batch_size": 16,
                        "dmd.fake_updates_per_generator_update": 1}, mesh_devices=n_dev)
  step = jax.jit(lambda s, b, k: dmd.train_step(s, run.frozen, b, k, teacher=run.teacher, hyper=run.hyper),
                 in_shardings=(run.state_sharding, sharding.batch_sharding(run.mesh), None))
  state = run.init_state()
  ks = []
  for i in range(6):
    state, m = step(state, _real_batch(16, seed=i), streams.key(0, "train"))
    ks.append(int(m["generator_step_index"]))
  out[n_dev] = (ks, [np.asarray(a) for a in jax.tree.leaves(state["generator"]["params"])])
assert out[1][0] == out[8][0], out
assert len(set(out[1][0])) > 1, out[1][0]
err = max(float(np.max(np.abs(a - b))) for a, b in zip(out[1][1], out[8][1]))
print(json.dumps({"ks": out[1][0], "max_abs_diff": err}))
assert err < 1e-5, err
"""
  import subprocess
  from helpers import env_with_devices
  p = subprocess.run([os.sys.executable, "-c", script], cwd=ROOT, env=env_with_devices(8), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  print(p.stdout)
