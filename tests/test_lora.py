"""LoRA generators on the teacher's own arrays (docs/lora.md): the adapter count the config implies, the
adapted network equal to its base at step 0, the merge equal to PEFT's two-layer form, and
``configs/coco.py:tiny,lora`` as a user runs it (train → resume → sample → export, loaded by diffusers' LoRA
loading; a checkpoint of another teacher refused). The memory saved: tests/test_sd_memory_bench.py."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import NO_EVALS_SD, ROOT, env_with_devices, run_main

from dmd_jax import families, lora, sharding, train

COCO_LORA = os.path.join(ROOT, "configs", "coco.py:tiny,lora")


def _coco_lora(workdir, lr: float | None = None):
  """``configs/coco.py:tiny,lora`` without regression pairs, built in this process on one device."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import coco
  c = coco.get_config("tiny,lora")
  c.regression.weight = 0.0
  if lr is not None:
    c.optim.lr, c.optim.warmup_steps = lr, 1
  teacher, frozen = families.build(c, str(workdir))
  return c, train.build(c, teacher, frozen, sharding.make_mesh(1, 1, devices=jax.devices()[:1]), str(workdir))


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("coco_lora")
  return wd, *_coco_lora(wd)


def _torch_count(workdir, targets, rank):
  """The adapter parameters the targets imply, counted on the teacher's PyTorch state dict (diffusers names):
  every Linear / Conv2d weight of a module whose name is a target or ends with '.' + target."""
  from safetensors.numpy import load_file
  sd = load_file(os.path.join(workdir, "random_sd-source", "unet", "diffusion_pytorch_model.safetensors"))
  n = modules = 0
  for key, w in sd.items():
    module, leaf = key.rsplit(".", 1)
    if leaf != "weight" or w.ndim not in (2, 4) or not any(module == t or module.endswith("." + t)
                                                           for t in targets):
      continue
    out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))      # [out, in] or [out, in, kh, kw]
    n += rank * (fan_in + out)
    modules += 1
  return n, modules


def test_trainable_parameters_are_the_adapters_the_config_implies(coco_run):
  wd, config, run = coco_run
  from dmd_jax.families.sd.teacher import LORA_TARGETS
  plan = run.lora["generator"]
  assert plan.rank == 4 and plan.alpha == 8.0 and plan.targets == LORA_TARGETS and "fake_score" not in run.lora
  want, modules = _torch_count(wd, LORA_TARGETS, 4)
  assert modules == len(plan.modules) == 79 and want == plan.num_params() == 43_072
  state = jax.eval_shape(run.init_state)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(state["generator"]["params"]) == want
  # Adam's two moments, for the adapters only; the fake score stays a full copy of the UNet
  assert count(state["generator"]["opt_state"]) == 2 * want + 1   # + Adam's count (the lr schedule runs on the iteration)
  unet = count(run.frozen["teacher"]["unet"])
  assert count(state["fake_score"]["params"]) == unet and want < 0.2 * unet
  print(f"\nLoRA r4 on coco:tiny: {want:,} trainable parameters in {modules} modules (UNet {unet:,})")


def test_edm_targets_are_the_networks_equivalents(tmp_path):
  """An EDM teacher (cifar10:tiny's DDPM++): the default targets adapt every attention, block convolution, skip,
  noise-embedding affine and the noise-embedding MLP, counted on the teacher's EDM state dict."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import cifar10
  from dmd_jax.families.edm import convert as edm_convert
  from dmd_jax.families.edm.teacher import LORA_TARGETS
  c = cifar10.get_config("tiny")
  c.model.lora.rank = 2
  teacher, frozen = families.build(c, str(tmp_path))
  plan = train.lora_plans(c, teacher, frozen)["generator"]
  sd = edm_convert.random_state_dict(json.loads(c.teacher.random_init_kwargs))
  want = modules = 0
  for key, w in sd.items():
    module, leaf = key.rsplit(".", 1)
    if leaf == "weight" and w.ndim in (2, 4) and lora.matches(module, LORA_TARGETS):
      want += 2 * (int(np.prod(w.shape[1:])) + w.shape[0])
      modules += 1
  names = {p[-1] for p, _ in plan.modules}
  assert names == set(LORA_TARGETS) and len(plan.modules) == modules == 45 and plan.num_params() == want
  adapters = plan.init(jax.random.PRNGKey(0))
  merged = plan.merge(frozen["teacher"], jax.tree.map(lambda x: x + 0.1, adapters))
  changed = sum(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(frozen["teacher"])))
  assert changed == modules


def test_adapted_generator_starts_as_the_teacher(coco_run):
  wd, config, run = coco_run
  state = run.init_state()
  up = [x for p, x in jax.tree_util.tree_flatten_with_path(state["generator"]["params"])[0]
        if str(p[-1].key) == lora.UP]
  assert up and all(float(jnp.abs(u).max()) == 0.0 for u in up)
  params = run.generator_params(state["generator"])
  z = jax.random.normal(jax.random.PRNGKey(0), (2, *run.teacher.sample_shape))
  cond = run.teacher.conditions.draw(jax.random.PRNGKey(1), 2)
  ours = run.teacher.generate(params, z, cond)
  teacher = run.teacher.generate(run.frozen["teacher"]["unet"], z, cond)
  assert float(jnp.abs(ours - teacher).max()) == 0.0
  # a non-zero adapter changes exactly its kernel, by scale · down ⊗ up
  adapters = jax.tree.map(lambda x: x + 0.1, state["generator"]["params"])
  merged = run.lora["generator"].merge(run.frozen["teacher"]["unet"], adapters)
  a = adapters["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  w = run.frozen["teacher"]["unet"]["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  got = merged["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
  np.testing.assert_allclose(got, w["kernel"] + 2.0 * a[lora.DOWN] @ a[lora.UP], rtol=1e-6)   # 8 / 4 = 2
  norm = merged["down_blocks_1"]["attentions_0"]["norm"]
  assert norm["scale"] is run.frozen["teacher"]["unet"]["down_blocks_1"]["attentions_0"]["norm"]["scale"]


def test_conv_merge_equals_peft_two_convolutions():
  """PEFT adapts ``Conv2d(in, out, k)`` with ``Conv2d(in, r, k)`` then ``Conv2d(r, out, 1)``: the merged kernel
  gives the same output as the base convolution plus scale × the two adapter convolutions."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  plan = lora.Plan(((("conv",), (3, 3, 6, 5)),), rank=2, alpha=3.0, targets=("conv",))
  adapter = {lora.DOWN: jnp.asarray(rng.normal(size=(3, 3, 6, 2)), jnp.float32),
             lora.UP: jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}
  merged = plan.merge({"conv": {"kernel": w}}, {"conv": adapter})["conv"]["kernel"]
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 6)), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  two = conv(x, w) + 1.5 * conv(conv(x, adapter[lora.DOWN]), adapter[lora.UP][None, None])
  np.testing.assert_allclose(conv(x, merged), two, rtol=1e-4, atol=1e-4)
  assert plan.num_params() == 2 * (3 * 3 * 6 + 5)


def test_lora_errors(tmp_path, coco_run):
  wd, config, run = coco_run
  with pytest.raises(ValueError, match=r"targets \['nothing_like_this'\] match no dense or convolution kernel"):
    lora.plan(run.frozen["teacher"]["unet"], run.teacher.lora, 4, 8.0, ("to_q", "nothing_like_this"))
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lora.plan(run.frozen["teacher"]["unet"], run.teacher.lora, -1, 8.0)
  with pytest.raises(ValueError, match="not a copy of the teacher network"):
    lora.plan({}, None, 4, 8.0)
  fp = lora.fingerprint(run.frozen["teacher"]["unet"])
  lora.check_fingerprint(dict(fp, sum=fp["sum"] * (1 + 1e-9)), fp, "here")
  with pytest.raises(ValueError, match="LoRA adapters of another teacher"):
    lora.check_fingerprint(dict(fp, sum_sq=fp["sum_sq"] * 1.01), fp, "here")


def test_coco_tiny_lora_train_resume_sample_export(tmp_path):
  """A user's LoRA run: train, resume, sample a prompt, export; diffusers' own LoRA loading of the exported
  adapters on the teacher's pipeline gives our generator's output; a checkpoint of another teacher is refused."""
  import torch
  from PIL import Image
  from diffusers import StableDiffusionPipeline, UNet2DConditionModel
  from fixture_testing import rel_err
  from dmd_jax import modes
  # a large learning rate, so that three steps move the adapters far from zero (what the export must carry)
  flags = ["--config.regression.weight=0", *NO_EVALS_SD, "--config.optim.lr=0.01",
           "--config.optim.warmup_steps=1"]
  run = lambda *a, **k: run_main(f"--workdir={tmp_path}", *flags, *a, config=COCO_LORA, fast_compile=True,
                                 timeout=900, **k)
  run("--config.num_train_steps=2")
  p = run("--config.num_train_steps=3")
  assert "resumed from" in p.stderr and "at step 2" in p.stderr and "generator_grad_norm=" in p.stderr
  out = tmp_path / "bus.png"
  p = run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={out}")
  assert "of step 3" in p.stdout and np.asarray(Image.open(out)).std() > 0

  # export: the merged UNet and the adapters alone, for the teacher's own diffusers pipeline
  pipeline_src = tmp_path / "random_sd-source"
  p = subprocess.run([sys.executable, "-m", "dmd_jax.export", f"--config={COCO_LORA}", f"--workdir={tmp_path}",
                      f"--dst={tmp_path / 'export'}", *flags], cwd=ROOT, env=env_with_devices(None),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  manifest = json.load(open(tmp_path / "export" / "dmd_jax_generator.json"))
  assert manifest["lora"]["rank"] == 4 and manifest["lora"]["num_params"] == 43_072
  config, lora_run = _coco_lora(tmp_path, lr=0.01)
  gen_state = modes.latest_generator(lora_run, 3)[0]
  params = lora_run.generator_params(gen_state)
  z = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  cond = np.asarray(lora_run.teacher.conditions.lookup(np.array([0, 3])), np.float32)
  ours = np.asarray(jax.jit(lora_run.teacher.generate)(params, jnp.asarray(z), jnp.asarray(cond)))
  base = np.asarray(jax.jit(lora_run.teacher.generate)(lora_run.frozen["teacher"]["unet"], jnp.asarray(z),
                                                       jnp.asarray(cond)))
  abar = manifest["schedule"]["alphas_cumprod_at_timesteps"]["999"]
  z_t = torch.from_numpy(z).permute(0, 3, 1, 2)

  def x0(unet):
    with torch.no_grad():
      eps = unet.eval()(z_t, 999, encoder_hidden_states=torch.from_numpy(cond)).sample.double()
    return ((z_t.double() - np.sqrt(1 - abar) * eps) / np.sqrt(abar)).permute(0, 2, 3, 1).numpy()

  merged = x0(UNet2DConditionModel.from_pretrained(str(tmp_path / "export" / "unet")))
  pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_src))
  pipe.load_lora_weights(str(tmp_path / "export" / "lora"))
  with_lora = x0(pipe.unet)
  moved = rel_err(base, ours)
  print(f"\nLoRA export: generator vs teacher {moved:.2e}; diffusers merged UNet {rel_err(merged, ours):.2e}; "
        f"teacher + load_lora_weights {rel_err(with_lora, ours):.2e}")
  assert moved > 1e-3                                  # the adapters changed the network
  assert rel_err(merged, ours) < 1e-5 and rel_err(with_lora, ours) < 1e-5

  # the adapters of this run on another teacher: refused, naming the checkpoint
  from dmd_jax.families.sd import convert as sdc
  other = sdc.write_random_converted(str(tmp_path / "other_teacher"), seed=1)
  p = run("--mode=sample", "--prompt=a red bus", "--num_samples=4", f"--output={out}",
          f"--config.teacher.path={other}", check=False)
  assert p.returncode == 2 and "LoRA adapters of another teacher" in p.stderr and "checkpoint 3" in p.stderr
