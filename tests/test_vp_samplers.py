"""DDIM and PNDM with classifier-free guidance against diffusers' schedulers driven step by step.

Both sides use the same deterministic eps function (a fixed random linear map of x, t and the conditioning,
written once in JAX and once in PyTorch), the scheduler configured as Stable Diffusion 1.5's
(scaled-linear betas 0.00085 -> 0.012, steps_offset 1, set_alpha_to_one False, leading spacing, no clipping).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dmd_jax import samplers
from dmd_jax.schedules import scaled_linear_alphas_cumprod
from fixture_testing import rel_err

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
N, H, W, C, L, D = 3, 4, 4, 4, 5, 6


@pytest.fixture(scope="module")
def problem():
  r = np.random.RandomState(0)
  w = dict(A=(0.8 * np.eye(C) + 0.05 * r.randn(C, C)).astype(np.float32),
           B=(0.1 * r.randn(C, C)).astype(np.float32),
           P=(0.3 * r.randn(D, C)).astype(np.float32),
           b=(0.1 * r.randn(C)).astype(np.float32))
  z = r.randn(N, H, W, C).astype(np.float32)
  cond = r.randn(N, L, D).astype(np.float32)
  uncond = r.randn(1, L, D).astype(np.float32)
  return w, z, cond, uncond


def jax_eps_fn(w):
  A, B, P, b = (jnp.asarray(w[k]) for k in "ABPb")

  def eps_fn(x, t, cond):
    s = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    c = (cond.mean(axis=1) @ P)[:, None, None, :]
    return x @ A + s * (x @ B) + c + s * b
  return eps_fn


def torch_eps(w, x, t, cond):
  import torch
  A, B, P, b = (torch.from_numpy(w[k]) for k in "ABPb")
  s = torch.full((x.shape[0], 1, 1, 1), float(t) / 1000.0, dtype=torch.float32)
  c = (cond.mean(dim=1) @ P)[:, None, None, :]
  return x @ A + s * (x @ B) + c + s * b


def diffusers_sample(kind, w, z, cond, uncond, num_steps, g, alphas=None):
  """The StableDiffusionPipeline denoising loop: batched [uncond; cond], guidance, scheduler.step."""
  import torch
  from diffusers import DDIMScheduler, PNDMScheduler
  sched = (DDIMScheduler(**SD15) if kind == "ddim" else
           PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in SD15.items() if k != "clip_sample"}))
  if alphas is not None:  # float64 table cast to float32, as ours
    sched.alphas_cumprod = torch.from_numpy(alphas.astype(np.float32))
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(z) * sched.init_noise_sigma
  cond_t = torch.from_numpy(cond)
  unc_t = torch.from_numpy(uncond).expand_as(cond_t)
  n_evals = 0
  for t in sched.timesteps:
    if g is None:
      eps = torch_eps(w, x, t, cond_t)
    else:
      e = torch_eps(w, torch.cat([x, x]), t, torch.cat([unc_t, cond_t]))
      eu, ec = e.chunk(2)
      eps = eu + g * (ec - eu)
    n_evals += 1
    x = sched.step(eps, t, x).prev_sample
  return x.numpy(), n_evals, np.asarray(sched.timesteps)


SAMPLERS = {"ddim": samplers.ddim_sample, "pndm": samplers.pndm_sample}


@pytest.mark.parametrize("kind", ["ddim", "pndm"])
@pytest.mark.parametrize("num_steps,g", [(50, 3.0), (50, None), (7, 8.0), (2, 3.0), (1, 3.0)])
def test_matches_diffusers(problem, kind, num_steps, g):
  w, z, cond, uncond = problem
  ref, n_evals, _ = diffusers_sample(kind, w, z, cond, uncond, num_steps, g)
  calls = []
  eps_fn = jax_eps_fn(w)

  def counted(x, t, c):
    calls.append(x.shape[0])
    return eps_fn(x, t, c)

  fn = jax.jit(lambda z, c, u: SAMPLERS[kind](
      counted, z, c, None if g is None else u, num_steps=num_steps,
      guidance_scale=1.0 if g is None else g))
  out = np.asarray(fn(z, cond, uncond))
  # Traced once: scan bodies count once, so count Python-level evaluations from the timestep schedule.
  assert set(calls) == {N if g is None else 2 * N}
  err = rel_err(out, ref)
  print(f"{kind} steps={num_steps} g={g}: rel err {err:.2e} vs diffusers (its float32 alphas)")
  assert err <= 1e-5
  assert n_evals == (num_steps if kind == "ddim" or num_steps == 1 else num_steps + 1)


@pytest.mark.parametrize("kind", ["ddim", "pndm"])
def test_same_alpha_table_is_tighter(problem, kind):
  """Driving diffusers with our float64-computed alphas (cast to float32) isolates the step arithmetic."""
  w, z, cond, uncond = problem
  ref, _, _ = diffusers_sample(kind, w, z, cond, uncond, 50, 3.0, alphas=scaled_linear_alphas_cumprod())
  out = SAMPLERS[kind](jax_eps_fn(w), jnp.asarray(z), jnp.asarray(cond), jnp.asarray(uncond),
                       num_steps=50, guidance_scale=3.0)
  err = rel_err(out, ref)
  print(f"{kind} 50 steps g=3, same alpha table: rel err {err:.2e}")
  assert err <= 1e-5


def test_timesteps_match_diffusers():
  from diffusers import DDIMScheduler, PNDMScheduler
  for n in (1, 2, 7, 50, 1000):
    d = DDIMScheduler(**SD15)
    d.set_timesteps(n)
    np.testing.assert_array_equal(samplers.leading_timesteps(n), np.asarray(d.timesteps))
    p = PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in SD15.items() if k != "clip_sample"})
    p.set_timesteps(n)
    ts = samplers.leading_timesteps(n)
    want = np.concatenate([ts[:1], ts[1:2], ts[1:]]) if n > 1 else ts
    np.testing.assert_array_equal(want, np.asarray(p.timesteps))
  assert samplers.leading_timesteps(50)[[0, -1]].tolist() == [981, 1]
  with pytest.raises(ValueError):
    samplers.leading_timesteps(0)


def test_guidance_batches_uncond_first_and_broadcasts():
  seen = {}

  def eps_fn(x, t, c):
    seen["x"], seen["t"], seen["c"] = x.shape, t, c
    return jnp.broadcast_to(c[:, :1, :1, None], x.shape)   # eps = the embedding's first value

  x = jnp.zeros((2, 3, 3, 1))
  cond = jnp.full((2, 4, 5), 2.0)
  uncond = jnp.full((1, 4, 5), 1.0)
  e = samplers.guided_eps(eps_fn, x, 7, cond, uncond, 3.0)
  assert seen["x"] == (4, 3, 3, 1) and seen["t"].shape == (4,) and seen["t"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(seen["c"][:2]), 1.0)
  np.testing.assert_allclose(np.asarray(e), 1.0 + 3.0 * (2.0 - 1.0))
  assert e.dtype == jnp.float32
