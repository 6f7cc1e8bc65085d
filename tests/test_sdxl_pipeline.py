"""Stable Diffusion XL runs (``configs/sdxl.py``) end to end on CPU, and their exports in diffusers.

* Every ``:tiny`` variant through the command line as a user runs it (slow): the 4-step DMD2 generator with the
  GAN on the prepared tfds coco_captions train latents (train, resume, ``--mode=sample --prompt``,
  ``--mode=eval``, ``python -m dmd_jax.export --teacher_src``), the LoRA generator (train, export: the adapters
  alone), the 1-step regression stage then the 1-step DMD2 run initialised from it (``init_from``).
* The export in diffusers (float32, the tiny random teacher): the exported ``unet/`` reproduces our 4-step
  generator's latents with the same noises (by hand from the manifest's instructions, and through
  ``StableDiffusionXLPipeline`` with DMD2's ``LCMScheduler`` recipe); the pipeline's ``encode_prompt`` gives our
  packed condition's parts; a LoRA export loaded with ``load_lora_weights`` on the teacher's pipeline gives the
  exported merged UNet. The checkpoints there are written by the trainer's ``Checkpointer``, with generator
  parameters standing in for training (the teacher's perturbed by 20 %; random LoRA adapters) and the rest of
  the train state zeros: built on the host, so that no train step or state initialisation is compiled.
* The SDXL GAN head (``ConvGANHead`` on the 32 × 32 bottleneck) against the official PyTorch head.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixture_testing import rel_err
from helpers import ROOT, env_with_devices, no_evals, run_main

from dmd_jax import checkpoint, config_lib, export, export_lib, train
from dmd_jax.families.sdxl import convert as sdxlc
from dmd_jax.families.sdxl import teacher as sdxl_teacher
from dmd_jax.models.gan_head import ConvGANHead

SDXL = os.path.join(ROOT, "configs", "sdxl.py")
NO_EVALS = no_evals("grid", "coco")
STEPS4 = (999, 749, 499, 249)
PROMPTS = ["a red bus", "two birds on a wire"]   # the second longer than the tiny tokenizers' 16: truncated


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tfds_testing
  return tfds_testing.prepare(str(tmp_path_factory.mktemp("tfds")), [tfds_testing.CocoCaptions])


def _cli(workdir, variant, *args, **kw):
  return run_main(f"--workdir={workdir}", *args, config=f"{SDXL}:{variant}", fast_compile=True, timeout=900, **kw)


def _export_cli(workdir, variant, dst, *args):
  p = subprocess.run([sys.executable, "-m", "dmd_jax.export", f"--config={SDXL}:{variant}", f"--workdir={workdir}",
                      f"--dst={dst}", *args], cwd=ROOT, env=env_with_devices(None), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


# ---------------------------------------------------------------------------------------------------------
# The :tiny variants through the command line
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sdxl_tiny_steps4_train_resume_sample_eval_export(tmp_path, tfds_dir):
  """``configs/sdxl.py:tiny``: 4-step DMD2 with the GAN critic on COCO train latents; train, resume, a prompt's
  images, the COCO evaluator, and the export as a whole ``StableDiffusionXLPipeline`` folder."""
  from PIL import Image
  wd = tmp_path / "run"
  run = lambda *a, **k: _cli(wd, "tiny", f"--config.gan.real_data.data_dir={tfds_dir}", *a, **k)
  p = run("--config.num_train_steps=2", *NO_EVALS)
  assert "compiled the train step" in p.stderr and "gan_critic_loss=" in p.stderr
  assert "real latents: 2 shards of 6 coco_captions[train] images at 16px built" in p.stderr
  assert os.path.isfile(wd / "random_sdxl" / "text_encoder_2" / "params.npz")
  assert json.load(open(wd / "metrics.json"))["steps"] == 2

  p = run("--config.num_train_steps=4", *NO_EVALS)
  assert "resumed from" in p.stderr and "at step 2" in p.stderr and "train step 4/4" in p.stderr
  assert "train step 1/4" not in p.stderr and "embedding 8 prompts" not in p.stderr   # embeddings reused
  assert json.load(open(wd / "metrics.json"))["steps"] == 4

  out = tmp_path / "bus.png"
  p = run("--mode=sample", "--prompt=a red bus", "--num_samples=2", f"--output={out}")
  assert "(4 NFE) of step 4" in p.stdout
  img = Image.open(out)
  assert img.size == (2 * 18 + 2, 18 + 2) and img.mode == "RGB"   # a 2-column grid of two 16 px images
  assert np.asarray(img)[2:18, 2:18].std() > 0

  run("--mode=eval", "--config.evals.grid.type=")
  e = json.load(open(wd / "eval_step4.json"))
  assert e["num_samples"] == 8 and e["captions"] == "train_prompts" and e["reference_stats"] == "teacher"
  assert np.isfinite(e["fid"]) and e["fid"] > 0 and 0 < e["clip_score"] <= 100

  # the export with the diffusers folder the run's random teacher comes from (the same seed and configs)
  src = sdxlc.write_random_pipeline(str(tmp_path / "teacher_src"), seed=0)
  dst = tmp_path / "export"
  p = _export_cli(wd, "tiny", dst, f"--teacher_src={src}", *NO_EVALS)
  assert "of step 4" in p.stdout
  assert sorted(os.listdir(dst)) == ["dmd_jax_generator.json", "model_index.json", "scheduler", "text_encoder",
                                     "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
  m = json.load(open(dst / "dmd_jax_generator.json"))
  assert m["family"] == "sdxl" and m["timesteps"] == list(STEPS4) and m["source"]["step"] == 4
  assert m["vae_scaling_factor"] == 0.13025 and m["latent_shape"] == [4, 8, 8]
  assert json.load(open(dst / "model_index.json"))["_class_name"] == "StableDiffusionXLPipeline"


@pytest.mark.slow
def test_sdxl_tiny_lora_train_export(tmp_path, tfds_dir):
  """``configs/sdxl.py:lora,tiny``: the LoRA generator trains; its export holds the merged UNet and the adapters
  alone for ``load_lora_weights`` (loaded and compared in :func:`test_sdxl_lora_export_loads_on_the_teacher`)."""
  flags = [f"--config.gan.real_data.data_dir={tfds_dir}", *NO_EVALS]
  p = _cli(tmp_path, "lora,tiny", "--config.num_train_steps=2", *flags)
  assert "compiled the train step" in p.stderr and "gan_critic_loss=" in p.stderr
  assert json.load(open(tmp_path / "metrics.json"))["steps"] == 2
  dst = tmp_path / "export"
  _export_cli(tmp_path, "lora,tiny", dst, *flags)
  assert os.path.getsize(dst / "lora" / "pytorch_lora_weights.safetensors") > 0
  assert os.path.isfile(dst / "unet" / "diffusion_pytorch_model.safetensors")
  m = json.load(open(dst / "dmd_jax_generator.json"))
  assert m["lora"]["rank"] == 4 and m["lora"]["file"] == "lora/pytorch_lora_weights.safetensors"
  assert "StableDiffusionXLPipeline.from_pretrained" in m["lora"]["load"]


@pytest.mark.slow
def test_sdxl_tiny_steps1_ode_then_dmd2(tmp_path, tfds_dir):
  """``configs/sdxl.py:steps1,ode,tiny`` (the 1-step generator's LPIPS regression on the teacher's guided DDIM
  pairs, no GAN), then ``:steps1,tiny`` (DMD2 with the GAN) initialised from it."""
  ode, dmd2 = tmp_path / "ode", tmp_path / "steps1"
  p = _cli(ode, "steps1,ode,tiny", "--config.num_train_steps=2", *NO_EVALS)
  assert "compiled the train step" in p.stderr and "regression_loss=" in p.stderr
  assert "gan_critic_loss" not in p.stderr and not os.path.exists(ode / "real_latents")
  spec = json.load(open(ode / "pairs" / "spec.json"))
  assert spec["sampler"] == "ddim" and spec["guidance_scale"] == 8.0
  assert json.load(open(ode / "metrics.json"))["steps"] == 2

  p = _cli(dmd2, "steps1,tiny", "--config.num_train_steps=2", f"--config.gan.real_data.data_dir={tfds_dir}",
           f"--config.init_from.workdir={ode}", *NO_EVALS)
  assert f"initialised from checkpoint 2 of {ode}" in p.stderr and "a new GAN head" in p.stderr
  assert "gan_critic_loss=" in p.stderr and not os.path.exists(dmd2 / "pairs")
  assert json.load(open(dmd2 / "metrics.json"))["steps"] == 2


# ---------------------------------------------------------------------------------------------------------
# The export in diffusers
# ---------------------------------------------------------------------------------------------------------

def _fast_compile(f, *args):
  """``jit(f)`` compiled for ``args`` without LLVM's expensive passes (tiny networks: compile time dominates)."""
  return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True})


def _trained_run(variant: str, workdir, generator_params):
  """A ``configs/sdxl.py:<variant>`` run (evaluators off, no LPIPS) with checkpoint 4 written by the trainer's
  ``Checkpointer``: the generator's parameters ``generator_params(run)`` (host arrays), everything else zeros
  (the export reads the generator only; built on the host, nothing compiled). Returns ``(config, run,
  generator state)``."""
  config = config_lib.load("sdxl", variant)
  config.evals.grid.type = config.evals.coco.type = ""
  config.regression.distance = "mse"
  run = train.setup(config, str(workdir))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), run.abstract_state)
  state["generator"]["params"] = generator_params(run)
  state["step"] = np.asarray(4, np.int32)
  state = jax.device_put(state, run.state_sharding)
  ckpt = checkpoint.Checkpointer(run.workdir)
  ckpt.save(4, state, {**run.checkpoint_meta(), "step": 4})
  ckpt.wait()
  ckpt.close()
  return config, run, state["generator"]


def _torch_added(cond, pooled_width, time_ids):
  """Our packed condition → the diffusers UNet's ``encoder_hidden_states`` and ``added_cond_kwargs``."""
  import torch
  embeds, added = sdxl_teacher.unet_inputs_for(pooled_width, time_ids)(jnp.asarray(cond))
  return torch.from_numpy(np.array(embeds)), {k: torch.from_numpy(np.array(v)) for k, v in added.items()}


@pytest.mark.slow
def test_sdxl_export_reproduces_the_generator_in_diffusers(tmp_path, monkeypatch):
  """The exported ``unet/`` run by diffusers through the manifest's 4-step loop, with our sampler's noises,
  gives our generator's latents; so does ``StableDiffusionXLPipeline`` on the exported folder with the
  ``LCMScheduler`` at timesteps 999, 749, 499, 249 (DMD2's inference recipe), whose ``encode_prompt`` gives our
  packed condition's parts and zeros for the unconditional input."""
  import torch
  from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
  from diffusers.schedulers import scheduling_lcm
  rng = np.random.default_rng(0)
  perturbed = lambda run: jax.tree.map(lambda w: w * (1 + 0.2 * rng.normal(size=w.shape)).astype(np.float32),
                                       jax.device_get(run.frozen["teacher"]["unet"]))   # the teacher's, ±20 %
  config, run, gen = _trained_run("tiny", tmp_path / "run", perturbed)
  src = sdxlc.write_random_pipeline(str(tmp_path / "teacher_src"), seed=config.seed)   # the run teacher's source
  dst = tmp_path / "export"
  m = export.export(config, str(tmp_path / "run"), str(dst), teacher_src=src, config_name="configs/sdxl.py:tiny")
  assert m["family"] == "sdxl" and m["timesteps"] == list(STEPS4) and m["num_steps"] == 4
  assert m["guidance"] == "none" and m["latent_shape"] == [4, 8, 8] and m["vae_scaling_factor"] == 0.13025
  assert "added_cond_kwargs" in m["conditioning"] and m["source"]["parameters"] == "params"
  index = json.load(open(dst / "model_index.json"))
  assert index["_class_name"] == "StableDiffusionXLPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]

  # ours: the 4-step generator (dmd.sample_generator) on noise latents and two prompts' packed conditions
  params = export_lib.generator_network_params(run, gen)
  teacher = run.teacher
  z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  cond = np.asarray(teacher.conditions.encode_text(PROMPTS), np.float32)            # [2, 16 + 1, 48]
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  sample = _fast_compile(run.sample, params, z, cond, keys)
  ours = np.asarray(sample(params, z, cond, keys))
  as_teacher = np.asarray(sample(run.frozen["teacher"]["unet"], z, cond, keys))
  # the fresh noise of step j (dmd.sample_generator): normal(fold_in(keys[i], j)) for sample i
  noises = [np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), z.shape[1:]))(keys))
            for j in range(1, 4)]

  # diffusers: the exported UNet, the manifest's loop (x0 from eps; re-noise to the next timestep)
  unet, info = UNet2DConditionModel.from_pretrained(str(dst / "unet"), torch_dtype=torch.float32,
                                                    output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  unet_config, vae_config = (json.load(open(dst / part / "config.json")) for part in ("unet", "vae"))
  time_ids = sdxl_teacher.image_time_ids(unet_config, vae_config, 8)
  np.testing.assert_array_equal(time_ids, [16, 16, 0, 0, 16, 16])
  embeds, added = _torch_added(cond, 24, time_ids)
  abar = {int(t): a for t, a in m["schedule"]["alphas_cumprod_at_timesteps"].items()}
  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
  x = nchw(z).double()
  for j, t in enumerate(m["timesteps"]):
    if j:
      x = np.sqrt(abar[t]) * x + np.sqrt(1 - abar[t]) * nchw(noises[j - 1]).double()
    with torch.no_grad():
      eps = unet.eval()(x.float(), t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.double()
    x = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  by_hand = x.permute(0, 2, 3, 1).numpy()

  # the whole pipeline from the exported folder: its prompt encoding, then DMD2's LCM sampling with our noises
  pipe = StableDiffusionXLPipeline.from_pretrained(str(dst))
  assert pipe.config.force_zeros_for_empty_prompt
  with torch.no_grad():
    prompt_embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
  uncond = np.asarray(run.frozen["teacher"]["uncond"])
  pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
  queue = [nchw(n) for n in noises]
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: queue.pop(0))
  latents = pipe(prompt=PROMPTS, latents=nchw(z), num_inference_steps=4, guidance_scale=0.0, timesteps=list(STEPS4),
                 output_type="latent").images
  with_lcm = latents.permute(0, 2, 3, 1).numpy()

  errs = {"unet loop": rel_err(by_hand, ours), "pipeline + LCMScheduler": rel_err(with_lcm, ours),
          "prompt_embeds": rel_err(prompt_embeds.numpy(), cond[:, :-1]),
          "text_embeds": rel_err(pooled.numpy(), cond[:, -1, :24])}
  print("\nSDXL export vs ours: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        + f"; generator vs teacher {rel_err(as_teacher, ours):.2e}")
  assert rel_err(as_teacher, ours) > 1e-2                    # the export carries the checkpoint's parameters
  assert all(v <= 1e-5 for v in errs.values()), errs
  assert not queue                                           # the three fresh noises were used
  assert np.all(cond[:, -1, 24:] == 0)                       # the pooled row's padding
  assert float(neg_embeds.abs().max()) == float(neg_pooled.abs().max()) == 0 and not np.any(uncond)
  assert uncond.shape == (1, 17, 48)


@pytest.mark.slow
def test_sdxl_lora_export_loads_on_the_teacher(tmp_path):
  """A ``:lora,tiny`` checkpoint (random adapters, far from zero) exported: the teacher's own
  ``StableDiffusionXLPipeline`` with ``load_lora_weights(export/lora)`` gives the exported merged UNet and our
  generator network."""
  import torch
  from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
  rng = np.random.default_rng(0)
  adapters = lambda run: jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                                      run.abstract_state["generator"]["params"])
  config, run, gen = _trained_run("lora,tiny", tmp_path / "run", adapters)
  dst = tmp_path / "export"
  m = export.export(config, str(tmp_path / "run"), str(dst))
  assert sorted(os.listdir(dst)) == ["dmd_jax_generator.json", "lora", "unet"]
  assert m["lora"]["rank"] == 4 and m["lora"]["num_modules"] == len(run.lora["generator"].modules)

  # ours: the generator network (adapters merged) as a denoiser at t = 749, and the teacher's
  params = export_lib.generator_network_params(run, gen)
  z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  cond = np.asarray(run.teacher.conditions.encode_text(PROMPTS), np.float32)
  t = np.full((2,), 749, np.int32)
  denoise = _fast_compile(run.teacher.generate_at, params, z, t, cond)
  ours = np.asarray(denoise(params, z, t, cond))
  base = np.asarray(denoise(run.frozen["teacher"]["unet"], z, t, cond))

  teacher_dir = tmp_path / "run" / "random_sdxl"
  unet_config, vae_config = (json.load(open(teacher_dir / part / "config.json")) for part in ("unet", "vae"))
  embeds, added = _torch_added(cond, 24, sdxl_teacher.image_time_ids(unet_config, vae_config, 8))
  abar = float(run.teacher.schedule.alphas_cumprod[749])
  x_t = torch.from_numpy(z).permute(0, 3, 1, 2)

  def x0(unet):
    with torch.no_grad():
      eps = unet.eval()(x_t, 749, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.double()
    return ((x_t.double() - np.sqrt(1 - abar) * eps) / np.sqrt(abar)).permute(0, 2, 3, 1).numpy()

  merged = x0(UNet2DConditionModel.from_pretrained(str(dst / "unet")))
  pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "run" / "random_sdxl-source"))
  pipe.load_lora_weights(str(dst / "lora"))
  with_lora = x0(pipe.unet)
  moved = rel_err(base, ours)
  print(f"\nSDXL LoRA export: generator vs teacher {moved:.2e}; merged UNet vs ours {rel_err(merged, ours):.2e}; "
        f"teacher + load_lora_weights vs merged {rel_err(with_lora, merged):.2e}, "
        f"vs ours {rel_err(with_lora, ours):.2e}")
  assert moved > 1e-2                                        # the adapters change the network
  assert rel_err(merged, ours) <= 1e-5 and rel_err(with_lora, merged) <= 1e-5 and rel_err(with_lora, ours) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# The SDXL GAN head
# ---------------------------------------------------------------------------------------------------------

def test_sdxl_gan_head_matches_the_official_head():
  """``ConvGANHead`` on a 32 × 32 bottleneck is tianweiy/DMD2 main/sd_guidance.py's ``cls_pred_branch`` with
  ``args.sdxl`` (three stride-2 convs, the stride-4 conv, the 1 × 1 conv; GroupNorm(32) + SiLU between), here
  with 128 channels (32 groups of 4, as SDXL's 1280 are 32 groups of 40)."""
  import torch
  nn, c = torch.nn, 128
  conv = lambda k, s, p, out=c: nn.Conv2d(c, out, k, s, p)
  block = lambda k, s, p: [conv(k, s, p), nn.GroupNorm(32, c), nn.SiLU()]
  torch.manual_seed(0)
  head = nn.Sequential(*block(4, 2, 1), *block(4, 2, 1), *block(4, 2, 1), *block(4, 4, 0), conv(1, 1, 0, out=1))
  with torch.no_grad():       # non-trivial GroupNorm affine parameters
    for m in head:
      if isinstance(m, nn.GroupNorm):
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
  feats = np.random.default_rng(0).normal(size=(2, 32, 32, c)).astype(np.float32)
  with torch.no_grad():
    ref = head(torch.from_numpy(feats.transpose(0, 3, 1, 2))).numpy().reshape(2)

  ours_init = ConvGANHead().init(jax.random.PRNGKey(0), jnp.asarray(feats[:1]))["params"]
  names = ["conv0", "norm1", "conv3", "norm4", "conv6", "norm7", "conv9", "norm10", "conv12"]
  assert sorted(ours_init) == sorted(names)
  params = {}
  for name in names:
    m = head[int(name[4:])]
    if name.startswith("conv"):
      params[name] = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),   # OIHW → HWIO
                      "bias": jnp.asarray(m.bias.detach().numpy())}
    else:
      params[name] = {"scale": jnp.asarray(m.weight.detach().numpy()), "bias": jnp.asarray(m.bias.detach().numpy())}
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, dict(ours_init))
  ours = ConvGANHead().apply({"params": params}, jnp.asarray(feats))
  err = rel_err(ours, ref)
  print(f"\nSDXL GAN head 128x32x32: rel err {err:.2e}")
  assert ours.shape == (2,) and ours.dtype == jnp.float32
  assert err <= 1e-5
