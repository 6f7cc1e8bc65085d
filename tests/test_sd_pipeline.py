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

from helpers import NO_EVALS_SD, ROOT, read_shards, run_main

COCO_TINY = os.path.join(ROOT, "configs", "coco.py:tiny")


@pytest.mark.slow
def test_coco_tiny_train_resume_sample(tmp_path):
  from PIL import Image
  run = lambda *a, **k: run_main(f"--workdir={tmp_path}", *a, config=COCO_TINY, fast_compile=True,
                                 timeout=900, **k)
  # the grids and the COCO metrics: after the resume
  p = run("--config.num_train_steps=2", "--config.evals.grid.type=", "--config.evals.coco.num_samples=0")
  assert "compiled the train step" in p.stderr and "embedding 8 prompts" in p.stderr
  assert os.path.isfile(tmp_path / "random_sd" / "unet" / "params.npz")
  assert os.path.isfile(tmp_path / "random_sd-source" / "unet" / "diffusion_pytorch_model.safetensors")
  emb = glob.glob(str(tmp_path / "prompt_embeddings_*.npy"))
  assert len(emb) == 1 and np.load(emb[0]).shape == (8, 16, 32)
  shards = read_shards(tmp_path / "pairs")
  assert len(shards) == 2
  f = shards["shard-00001"]   # (noise latent, teacher latent, prompt id): pair i uses prompt i mod 8
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
  # end of training: COCO-style FID (random Inception, clean protocol; reference = the teacher's samples for
  # the same 8 captions, here the training prompts) and CLIP score (random CLIP stand-in)
  assert m["num_samples"] == 8 and m["captions"] == "train_prompts" and m["reference_stats"] == "teacher"
  assert np.isfinite(m["fid"]) and m["fid"] > 0 and 0 < m["clip_score"] <= 100
  assert "COCO eval, step 3: 8/8 images" in p.stderr and "FID reference (teacher): 8/8" in p.stderr
  assert len(glob.glob(str(tmp_path / "fid_reference_teacher_8_*.npz"))) == 1

  out, again, other = tmp_path / "bus.png", tmp_path / "bus_again.png", tmp_path / "bus_seed2.png"
  p = run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={out}", "--seed=1")
  assert "of step 3" in p.stdout
  img = Image.open(out)
  assert img.size == (2 * 18 + 2, 2 * 18 + 2) and img.mode == "RGB"   # 2×2 grid of 16 px images
  assert np.asarray(img).std() > 0
  # the same --seed gives the same PNG, byte for byte (also on another device count); another seed does not
  run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={again}", "--seed=1", devices=2)
  run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={other}", "--seed=2")
  assert again.read_bytes() == out.read_bytes()
  assert np.abs(np.asarray(Image.open(other), np.int32) - np.asarray(img, np.int32)).max() > 0

  # --mode=eval on COCO captions and reference images from a prepared tfds coco_captions (tiny, written here)
  import tfds_testing
  data_dir = tfds_testing.prepare(str(tmp_path / "tfds"), [tfds_testing.CocoCaptions])
  p = run("--mode=eval", "--config.evals.coco.captions=coco_captions", "--config.evals.coco.captions_split=val",
          "--config.evals.coco.reference_stats=tfds", "--config.evals.coco.reference_split=train",
          f"--config.evals.coco.data_dir={data_dir}", "--config.evals.coco.num_samples=5",
          "--config.evals.grid.type=")
  e = json.load(open(tmp_path / "eval_step3.json"))
  assert e["num_samples"] == 5 and e["captions"] == "coco_captions" and np.isfinite(e["fid"])
  assert 0 < e["clip_score"] <= 100
  caps = (tmp_path / "coco_captions_val_5.txt").read_text().splitlines()   # first caption of each image
  assert len(caps) == 5 and all(c.startswith("caption 0 of image 5_") for c in caps)
  ref = json.load(open(tmp_path / "fid_reference_coco_train.npz.json"))
  assert ref["count"] == tfds_testing.N_TRAIN["coco_captions"] and ref["protocol"] == "clean"

  p = run("--mode=sample", "--num_samples=4", f"--output={out}", check=False)
  assert p.returncode == 2 and "needs --prompt" in p.stderr

  # DMD2 as a user runs it (coco.py:dmd2 stage 1, then :dmd2,stage2 as a new run initialised from it). Stage 1:
  # guidance 1.75, no regression pairs, TTUR 10, no GAN. Stage 2 from its headless checkpoint: the networks are
  # taken, the head is new, the COCO train images of the prepared tfds split are VAE-encoded once into the
  # stage's workdir with their captions, and the GAN trains; then a prompt's images.
  dmd2_dir, stage2_dir = tmp_path / "dmd2", tmp_path / "dmd2_stage2"
  stage = lambda workdir, variant, *a, **k: run_main(
      f"--workdir={workdir}", f"--config.gan.real_data.data_dir={data_dir}", *a, config=COCO_TINY + variant,
      timeout=900, fast_compile=True, **k)
  p = stage(dmd2_dir, ",dmd2", "--config.num_train_steps=3", *NO_EVALS_SD)
  assert "compiled the train step" in p.stderr and "gan_critic_loss" not in p.stderr
  assert not os.path.exists(dmd2_dir / "pairs") and not os.path.exists(dmd2_dir / "real_latents")
  m = json.load(open(dmd2_dir / "metrics.json"))
  assert m["steps"] == 3 and "regression_loss" not in p.stderr
  from_stage1 = f"--config.init_from.workdir={dmd2_dir}"
  p = stage(stage2_dir, ",dmd2,stage2", "--config.num_train_steps=2", *NO_EVALS_SD, from_stage1)
  assert f"initialised from checkpoint 3 of {dmd2_dir}" in p.stderr and "a new GAN head" in p.stderr
  assert "real latents: 2 shards of 6 coco_captions[train] images at 16px built" in p.stderr
  shards = read_shards(stage2_dir / "real_latents")
  assert len(shards) == 2
  f = shards["shard-00000"]
  assert f["x"].shape == (3, 8, 8, 4) and np.all(np.isfinite(f["x"]))
  assert "gan_critic_loss=" in p.stderr and "skipped_steps=0" in p.stderr
  assert json.load(open(stage2_dir / "metrics.json"))["steps"] == 2
  stage(stage2_dir, ",dmd2,stage2", "--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={out}")
  assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)
  stage(stage2_dir, ",dmd2,stage2", "--mode=eval", "--config.evals.coco.num_samples=4", "--config.evals.grid.type=")
  e = json.load(open(stage2_dir / "eval_step2.json"))
  assert e["num_samples"] == 4 and np.isfinite(e["fid"]) and 0 < e["clip_score"] <= 100


def _fast_jit(f, *args):
  """``jit(f)(*args)`` compiled without LLVM's expensive passes (tiny networks: compile time dominates)."""
  return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True})(*args)


def test_real_denoiser_guidance(tmp_path):
  from dmd_jax import families
  from dmd_jax import config_lib
  from dmd_jax.families.sd.convert import load_converted_sd
  from dmd_jax.families.sd.teacher import real_denoiser
  config = config_lib.load("coco", "tiny")
  config.regression.distance = "mse"    # no LPIPS needed here
  nets, frozen = families.build(config, str(tmp_path))
  teacher = frozen["teacher"]
  assert config.guidance_scale == 3.0 and teacher["uncond"].shape == (1, 16, 32)
  unet = load_converted_sd(str(tmp_path / "random_sd"))["unet"][0]
  rng = np.random.default_rng(0)
  x_t = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  t = jnp.asarray([500, 900], jnp.int32)
  t999 = jnp.full((2,), 999, jnp.int32)
  cond = jnp.asarray(nets.conditions.lookup(np.array([0, 3])))
  real = lambda g: real_denoiser(unet, nets.schedule, g)

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
  from dmd_jax.guidance import classifier_free_guidance
  got = classifier_free_guidance(f, jnp.ones((2, 1)), jnp.zeros((2,), jnp.int32),
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
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]      # no temporaries left (hidden files too)
  s = pr.PromptSet(ps, lambda p, d=np.float32: encode(p, d), str(tmp_path), "enc")
  np.testing.assert_array_equal(s.lookup([2, 0, 2])[:, 0, 0], [3, 9, 3])
  with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 3\)"):
    s.lookup([3])
  with pytest.raises(FileNotFoundError, match="data.prompts_file"):
    pr.read_prompts_file(str(tmp_path / "missing.txt"))


def test_caption_images_and_clip_score(tmp_path):
  """COCO evaluation plumbing: image i is decode(G(z_i, embed(caption_i))) with z_i from fold_in(seed, i),
  whatever the chunking; the evaluator's CLIP score is clip_score on those images and captions."""
  from dmd_jax import config_lib, families, sharding
  from dmd_jax.convert import clip as clip_convert
  from dmd_jax.evaluation import clip_score
  from dmd_jax.evaluation import images as image_io
  from dmd_jax.evaluation import text_to_image as t2i
  config = config_lib.load("coco", "tiny")
  config.regression.distance = "mse"    # no LPIPS needed here
  nets, frozen = families.build(config, str(tmp_path))
  mesh = sharding.make_mesh()
  params = frozen["teacher"]["unet"]
  caps = ["a red bus", "two birds", "a dog", "red apples", "a bus"]
  key = lambda s: jax.random.PRNGKey(s)
  one_step = lambda p, z, c, keys: nets.generate(p, z, c)
  chunks = list(t2i.caption_images(nets, frozen, mesh, one_step, params, caps, key(7), chunk=2))
  assert [c for _, c in chunks] == [caps[:2], caps[2:4], caps[4:]]
  images = np.concatenate([x for x, _ in chunks])
  whole = np.concatenate([x for x, _ in t2i.caption_images(nets, frozen, mesh, one_step, params, caps, key(7), 8)])
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
  assert np.abs(images.astype(int) - whole).max() <= 1          # chunking does not change the images
  z3 = nets.sample_noise(jax.random.fold_in(jax.random.PRNGKey(7), 3), 1)
  direct = jax.jit(lambda p, f, z, c: nets.decode(f, nets.generate(p, z, c)))(
      params, frozen, z3, nets.conditions.encode_text(["red apples"]))
  assert np.abs(image_io.to_uint8(direct)[0].astype(int) - images[3]).max() <= 1
  other = np.concatenate([x for x, _ in t2i.caption_images(nets, frozen, mesh, one_step, params, caps, key(8), 8)])
  assert np.abs(other.astype(int) - images).max() > 10          # another seed, other images

  clip_dir = clip_convert.write_random_converted_clip(str(tmp_path / "clip"), seed=3)
  module, clip_params, tok = clip_convert.load_converted_clip(clip_dir)
  ev = t2i.CocoEvaluator(mesh, None, (module, clip_params, tok), batch_size=4)
  for x, c in chunks:
    ev.update(x, c)
  want = clip_score.clip_score(module, clip_params, tok, images, caps, resize_256=True)
  assert ev.count == 5 and want > 0
  np.testing.assert_allclose(ev.result(None)["clip_score"], want, rtol=1e-5)


def test_prompts_and_captions_from_tfds_coco(tmp_path):
  """Training prompts (every caption) and evaluation captions (the first of each image, cached) read from a
  prepared tfds coco_captions without decoding its images."""
  import ml_collections
  import tfds_testing
  from dmd_jax.data import input_pipeline as ip
  from dmd_jax.data.prompts import prompts_from_config
  from dmd_jax.evaluation import text_to_image as t2i
  data_dir = tfds_testing.prepare(str(tmp_path / "tfds"), [tfds_testing.CocoCaptions])
  src = ip.open_source("coco_captions", "train", data_dir)       # decoded, for the expected values
  want = [c.decode() for i in range(len(src)) for c in src[i]["captions"]["text"]]
  data = ml_collections.ConfigDict(dict(prompts=(), prompts_file="", coco_split="train", data_dir=data_dir,
                                        num_prompts=0))
  assert prompts_from_config(data) == want and len(want) == 5 * tfds_testing.N_TRAIN["coco_captions"]
  data.num_prompts = 6
  assert prompts_from_config(data) == want[:6]
  data.prompts_file = "prompts.txt"
  with pytest.raises(ValueError, match="set one of"):
    prompts_from_config(data)
  caps = t2i.coco_captions(data_dir, "train+val", 9, str(tmp_path))
  both = want[::5] + [ip.open_source("coco_captions", "val", data_dir)[i]["captions"]["text"][0].decode()
                      for i in range(2)]
  assert caps == both
  assert (tmp_path / "coco_captions_train-val_9.txt").read_text().splitlines() == both
  with pytest.raises(ValueError, match="fewer than"):
    t2i.coco_captions(data_dir, "val", 6, None)
