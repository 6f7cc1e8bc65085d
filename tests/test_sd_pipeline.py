"""``configs/coco.py:tiny`` end to end on CPU (a random-weight tiny SD pipeline written through the real
converter): prompt embeddings, guided-PNDM regression pairs, training, resume, ``--mode=sample --prompt``;
and the parts underneath: classifier-free guidance in the real denoiser, the prompt-embedding cache."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, run_main

COCO_TINY = os.path.join(ROOT, "configs", "coco.py:tiny")


def test_coco_tiny_train_resume_sample(tmp_path):
  from PIL import Image
  run = lambda *a, **k: run_main(f"--workdir={tmp_path}", *a, config=COCO_TINY, fast_compile=True,
                                 timeout=900, **k)
  p = run("--config.num_train_steps=2", "--config.eval.grid_samples=0")   # the grids: after the resume
  assert "compiled the train step" in p.stderr and "embedding 8 prompts" in p.stderr
  assert os.path.isfile(tmp_path / "random_sd" / "unet" / "params.npz")
  assert os.path.isfile(tmp_path / "random_sd-source" / "unet" / "diffusion_pytorch_model.safetensors")
  emb = glob.glob(str(tmp_path / "prompt_embeddings_*.npy"))
  assert len(emb) == 1 and np.load(emb[0]).shape == (8, 16, 32)
  shards = sorted(glob.glob(str(tmp_path / "pairs" / "shard-*.npz")))
  assert len(shards) == 2
  with np.load(shards[1]) as f:   # (noise latent, teacher latent, prompt id): pair i uses prompt i mod 8
    assert f["z"].shape == (4, 8, 8, 4) and f["x"].shape == (4, 8, 8, 4) and np.all(np.isfinite(f["x"]))
    np.testing.assert_array_equal(f["cond"], [4, 5, 6, 7])
  spec = json.load(open(tmp_path / "pairs" / "spec.json"))
  assert spec["sampler"] == "pndm" and spec["guidance_scale"] == 3.0
  assert json.load(open(tmp_path / "metrics.json"))["steps"] == 2
  assert not os.path.exists(tmp_path / "samples" / "step2.png")

  p = run("--config.num_train_steps=3")           # resume: same prompts, embeddings and pairs reused
  assert "resumed from" in p.stderr and "at step 2" in p.stderr
  assert "embedding 8 prompts" not in p.stderr and "building" not in p.stderr
  m = json.load(open(tmp_path / "metrics.json"))
  assert m["steps"] == 3 and m["teacher_nfe"] == 2 * (3 + 1)     # guided PNDM-3: 4 evaluations of 2 rows
  # one-step images above guided-PNDM teacher images, 2×2 tiles of 16 px each, VAE-decoded
  assert Image.open(tmp_path / "samples" / "step3.png").size == (2 * 18 + 2, 2 * (2 * 18 + 2) + 8)

  out = tmp_path / "bus.png"
  p = run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={out}", "--seed=1")
  assert "of step 3" in p.stdout
  img = Image.open(out)
  assert img.size == (2 * 18 + 2, 2 * 18 + 2) and img.mode == "RGB"   # 2×2 grid of 16 px images
  assert np.asarray(img).std() > 0

  p = run("--mode=sample", "--num_samples=4", f"--output={out}", check=False)
  assert p.returncode == 2 and "needs --prompt" in p.stderr


def _fast_jit(f, *args):
  """``jit(f)(*args)`` compiled without LLVM's expensive passes (tiny networks: compile time dominates)."""
  return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True})(*args)


def test_real_denoiser_guidance(tmp_path):
  from dmd_jax import networks
  from dmd_jax.config_lib import sd_config
  from dmd_jax.convert.sd import load_converted_sd
  config = sd_config(tiny=True)
  config.regression.distance = "mse"    # no LPIPS needed here
  nets, frozen = networks.build(config, str(tmp_path))
  teacher = frozen["teacher"]
  assert config.guidance_scale == 3.0 and teacher["uncond"].shape == (1, 16, 32)
  unet = load_converted_sd(str(tmp_path / "random_sd"))["unet"][0]
  rng = np.random.default_rng(0)
  x_t = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  t = jnp.asarray([500, 900], jnp.int32)
  t999 = jnp.full((2,), 999, jnp.int32)
  cond = jnp.asarray(nets.cond_table(np.array([0, 3])))
  real = lambda g: networks.sd_real_denoiser(unet, nets.schedule, g)

  def everything(p, x_t, z, cond):
    eps = lambda x, tt, c: unet.apply({"params": p["unet"]}, x, tt, c)
    return dict(eps_c=eps(x_t, t, cond), eps_u=eps(x_t, t, jnp.broadcast_to(p["uncond"], cond.shape)),
                real1=real(1.0)(p, x_t, t, cond), real0=real(0.0)(p, x_t, t, cond),
                real_cfg=nets.real_denoise(p, x_t, t, cond), fake=nets.fake_denoise(p["unet"], x_t, t, cond),
                gen=nets.generate(p["unet"], z, cond), gen_eps=eps(z, t999, cond))

  o = jax.device_get(_fast_jit(everything, teacher, x_t, z, cond))
  eps_c, eps_u = o["eps_c"], o["eps_u"]
  assert float(np.abs(eps_c - eps_u).max()) > 1e-3                 # the prompt matters
  to_x0 = lambda e: nets.schedule.eps_to_x0(x_t, e, t)
  tol = dict(rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(o["real1"], to_x0(eps_c), **tol)       # g = 1: the conditional prediction
  np.testing.assert_allclose(o["real0"], to_x0(eps_u), **tol)       # g = 0: the unconditional one
  np.testing.assert_allclose(o["real_cfg"], to_x0(eps_u + 3 * (eps_c - eps_u)), **tol)   # the config's g = 3
  np.testing.assert_allclose(o["fake"], to_x0(eps_c), **tol)        # the fake score is never guided
  # the generator: the UNet at t = 999 on unit noise, eps -> x0 (abar_999 ~ 0.0047: tolerance scaled)
  np.testing.assert_allclose(o["gen"], nets.schedule.eps_to_x0(z, o["gen_eps"], t999), rtol=1e-5, atol=1e-3)
  # the arithmetic itself, on a toy eps_fn: rows [uncond; cond] in one call
  f = lambda x, tt, c: x * c
  got = networks.classifier_free_guidance(f, jnp.ones((2, 1)), jnp.zeros((2,), jnp.int32),
                                          jnp.full((2, 1), 5.0), jnp.full((1, 1), 1.0), 2.5)
  np.testing.assert_allclose(got, np.full((2, 1), 1.0 + 2.5 * 4.0))


def test_prompt_embeddings_cached_once(tmp_path):
  from dmd_jax.data import prompts as pr
  calls = []

  def encode(ps, dtype):
    calls.append(len(ps))
    return np.stack([np.full((3, 2), len(p), dtype) for p in ps])

  path = tmp_path / "prompts.txt"
  path.write_text("a red bus\n\n  two birds \nred\n")
  ps = pr.read_prompts_file(str(path))
  assert ps == ["a red bus", "two birds", "red"]
  table = pr.cached_embeddings(str(tmp_path), ps, encode, "enc", chunk=2)
  assert calls == [2, 1] and table.shape == (3, 3, 2) and table[1, 0, 0] == 9
  again = pr.cached_embeddings(str(tmp_path), ps, encode, "enc", chunk=2)
  assert calls == [2, 1] and np.array_equal(again, table)           # reused, not recomputed
  pr.cached_embeddings(str(tmp_path), ps, encode, "another encoder", chunk=2)
  assert calls == [2, 1, 2, 1]                                      # a new key, a new cache
  assert not glob.glob(str(tmp_path / "*.tmp-*"))
  s = pr.PromptSet(ps, lambda p, d=np.float32: encode(p, d), str(tmp_path), "enc")
  np.testing.assert_array_equal(s.lookup([2, 0, 2])[:, 0, 0], [3, 9, 3])
  with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 3\)"):
    s.lookup([3])
  with pytest.raises(FileNotFoundError, match="data.prompts_file"):
    pr.read_prompts_file(str(tmp_path / "missing.txt"))
