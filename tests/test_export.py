"""``python -m dmd_jax.export`` (docs/export.md): a distilled generator in its teacher's format.

SD: a ``configs/coco.py:tiny`` checkpoint exported as a diffusers UNet, loaded by diffusers in PyTorch, whose
one-step x0 (computed from the export's json) is ours; with ``--teacher_src`` a whole ``StableDiffusionPipeline``
folder. EDM: the export converted back by ``python -m dmd_jax.convert edm`` gives the exported parameters exactly.
Toy: the npz holds the checkpoint's arrays. And the destination's rules: atomic replacement, refusals, errors.

The SD, EDM and toy checkpoints are written here by the trainer's own ``Checkpointer`` from the run's initial train
state with the generator's arrays (parameters and EMA) replaced by random ones, standing in for training:
exporting reads checkpoints, and a train step's compilation would only add a minute. A trained LoRA run is
exported, and loaded through diffusers' LoRA loading, in tests/test_lora.py.
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
from helpers import ROOT, env_with_devices

from dmd_jax import checkpoint, config_lib, export, export_lib, modes, train
from dmd_jax.convert.common import flatten_params
from dmd_jax.families.edm import export as edm_export
from dmd_jax.families.sd import export as sd_export

# the cheapest coco:tiny run that still trains and checkpoints: no regression pairs (and no LPIPS), no evaluators;
# an EMA, so that the export has to pick it
SD_OVERRIDES = {"num_train_steps": 2, "regression.weight": 0.0, "regression.distance": "mse",
                "evals.grid.type": "", "evals.coco.type": "",
                "ema.decay": 0.5}


def load_config(name: str, variant: str = "", overrides=None):
  config = config_lib.load(name, variant)
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def fast_jit(f, *args):
  """``jit(f)(*args)`` compiled without LLVM's expensive passes (tiny networks: compile time dominates)."""
  return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True})(*args)


def export_cli(*args, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dmd_jax.export", *args], cwd=ROOT, env=env_with_devices(None),
                        capture_output=True, text=True, timeout=timeout)


def leftovers(folder) -> list[str]:
  return [n for n in os.listdir(folder) if ".export-" in n]


def write_checkpoints(config, workdir, steps, seed=0):
  """Checkpoints ``steps`` of ``(config, workdir)`` written by the trainer's Checkpointer: the run's initial state
  with random generator parameters and EMA (different ones per step). Returns ``{step: (params, ema)}`` (flat)."""
  run = train.setup(config, str(workdir))
  state = run.init_state()
  ckpt = checkpoint.Checkpointer(run.workdir)
  rng = np.random.default_rng(seed)
  saved = {}
  for step in steps:
    gen = dict(state["generator"])
    noisy = lambda tree: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)
    gen["params"] = noisy(gen["params"])
    if "ema_params" in gen:
      gen["ema_params"] = noisy(gen["ema_params"])
    state = {**state, "generator": gen, "step": jnp.asarray(step, jnp.int32)}
    ckpt.save(step, state, {"config": config.to_json_best_effort(), "step": step})
    ckpt.wait()
    flat = lambda tree: flatten_params(jax.device_get(tree))
    saved[step] = (flat(gen["params"]), flat(gen["ema_params"]) if "ema_params" in gen else None)
  ckpt.close()
  return saved


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion
# ---------------------------------------------------------------------------------------------------------

def test_sd_export_loads_in_diffusers_and_matches(tmp_path):
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from dmd_jax.families.sd import convert as sd_convert
  workdir = tmp_path / "run"
  config = load_config("coco", "tiny", SD_OVERRIDES)
  # a checkpoint as the trainer writes it, with random generator parameters and EMA (a trained run, LoRA, is
  # exported in tests/test_lora.py)
  write_checkpoints(config, workdir, [2])

  dst = tmp_path / "export"
  manifest = export.export(config, str(workdir), str(dst), config_name="configs/coco.py:tiny")
  assert sorted(os.listdir(dst)) == ["dmd_jax_generator.json", "unet"]
  assert json.load(open(dst / "dmd_jax_generator.json")) == manifest
  assert manifest["family"] == "sd" and manifest["timesteps"] == [999] and manifest["num_steps"] == 1
  assert manifest["prediction_type"] == "epsilon" and manifest["guidance"] == "none"
  assert manifest["latent_shape"] == [4, 8, 8] and manifest["vae_scaling_factor"] == 0.18215
  assert manifest["schedule"]["beta_start"] == 0.00085 and manifest["schedule"]["num_train_timesteps"] == 1000
  assert manifest["source"]["step"] == 2 and manifest["source"]["parameters"] == "ema_params"
  assert manifest["source"]["config"] == "configs/coco.py:tiny"

  # the generator as the run sees it (the EMA), and its output on noise latents and a training prompt
  run = train.setup(config, str(workdir))
  gen_state = modes.latest_generator(run, 2)[0]
  params = export_lib.generator_network_params(run, gen_state)
  ema = flatten_params(jax.device_get(gen_state["ema_params"]))
  assert any(not np.array_equal(ema[k], v) for k, v in flatten_params(jax.device_get(gen_state["params"])).items())
  z = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
  cond = np.asarray(run.teacher.conditions.lookup(np.array([0, 3])), np.float32)       # [2, 16, 32]
  ours = np.asarray(fast_jit(run.teacher.generate, params, jnp.asarray(z), jnp.asarray(cond)))

  # the converter's inverse is exact both ways
  shapes = {k: v.shape for k, v in flatten_params(params).items()}
  back = flatten_params(sd_convert.convert_state_dict(sd_convert.to_torch_state_dict(params), shapes, "unet"))
  assert all(np.array_equal(back[k], ema[k]) for k in ema) and set(back) == set(ema)

  # diffusers loads it with no missing / unexpected keys; the one-step x0 from the json's instructions is ours
  unet, info = UNet2DConditionModel.from_pretrained(str(dst / "unet"), torch_dtype=torch.float32,
                                                    output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  t = manifest["timesteps"][0]
  abar = manifest["schedule"]["alphas_cumprod_at_timesteps"][str(t)]
  z_t = torch.from_numpy(z).permute(0, 3, 1, 2)
  with torch.no_grad():
    eps = unet.eval()(z_t, t, encoder_hidden_states=torch.from_numpy(cond)).sample.double()
  x0 = ((z_t.double() - np.sqrt(1 - abar) * eps) / np.sqrt(abar)).permute(0, 2, 3, 1).numpy()
  assert rel_err(x0, ours) < 1e-5

  # with --teacher_src (the diffusers folder the run's random teacher was converted from): a whole pipeline,
  # written over the first export; its one-step DDIM call (docs/export.md) gives the same latents
  with pytest.raises(ValueError, match="is not empty"):
    export.export(config, str(workdir), str(dst), teacher_src=str(workdir / "random_sd-source"))
  export.export(config, str(workdir), str(dst), overwrite=True, teacher_src=str(workdir / "random_sd-source"))
  assert {"model_index.json", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(dst))
  assert not leftovers(tmp_path)
  pipe = StableDiffusionPipeline.from_pretrained(str(dst))
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                             set_alpha_to_one=True, clip_sample=False)
  latents = pipe(prompt_embeds=torch.from_numpy(cond), latents=z_t, num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent").images
  assert rel_err(latents.permute(0, 2, 3, 1).numpy(), ours) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# EDM
# ---------------------------------------------------------------------------------------------------------

def test_edm_export_converts_back_exactly(tmp_path):
  from dmd_jax.convert.__main__ import main as convert_main
  from dmd_jax.convert.common import load_converted
  config = load_config("cifar10", "tiny", {"regression.distance": "l2", "ema.decay": 0.9})
  saved = write_checkpoints(config, tmp_path / "run", [3])
  dst = tmp_path / "export"
  manifest = export.export(config, str(tmp_path / "run"), str(dst))
  assert sorted(os.listdir(dst)) == ["dmd_jax_generator.json", "generator.safetensors", "init_kwargs.json"]
  assert manifest["family"] == "edm" and manifest["sigmas"] == [80.0] and manifest["sigma_data"] == 0.5
  assert manifest["label_dim"] == 10 and manifest["image_shape"] == [3, 16, 16]
  assert manifest["source"]["parameters"] == "ema_params"
  init_kwargs = json.load(open(dst / "init_kwargs.json"))
  assert init_kwargs == json.loads(config.teacher.random_init_kwargs)

  from safetensors.numpy import load_file
  sd = load_file(str(dst / "generator.safetensors"))
  assert "model.enc.16x16_conv.weight" in sd and all(v.dtype == np.float32 for v in sd.values())
  assert convert_main(["edm", f"--src={dst / 'generator.safetensors'}",
                       f"--init_kwargs={dst / 'init_kwargs.json'}", f"--dst={tmp_path / 'back'}"]) == 0
  back = flatten_params(load_converted(str(tmp_path / "back"))[0])
  _, ema = saved[3]
  assert set(back) == set(ema)
  assert max(float(np.abs(back[k] - ema[k]).max()) for k in ema) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Toy; the destination's rules and the errors
# ---------------------------------------------------------------------------------------------------------

TOY_OVERRIDES = {"generator.hidden": (16, 16), "fake_score.hidden": (16, 16), "regression.weight": 0.0}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy") / "run"
  config = load_config("toy2d", "", TOY_OVERRIDES)
  return config, workdir, write_checkpoints(config, workdir, [3, 5], seed=1)


def test_toy_export_cli(toy_run, tmp_path):
  config, workdir, saved = toy_run
  dst = tmp_path / "toy_export"
  args = ["--config=configs/toy2d.py", f"--workdir={workdir}", f"--dst={dst}",
          "--config.generator.hidden=(16,16)", "--config.fake_score.hidden=(16,16)", "--config.regression.weight=0"]
  p = export_cli(*args)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "of step 5" in p.stdout and "wrote generator.npz" in p.stdout and f"to {dst}" in p.stdout
  with np.load(dst / "generator.npz", allow_pickle=False) as f:
    got = {k: f[k] for k in f.files}
  params, _ = saved[5]    # no EMA in this run: the parameters themselves
  assert set(got) == set(params) == {"mlp/dense0/kernel", "mlp/dense0/bias", "mlp/dense1/kernel",
                                     "mlp/dense1/bias", "mlp/out/kernel", "mlp/out/bias"}
  assert all(np.array_equal(got[k], params[k]) for k in params)
  m = json.load(open(dst / "dmd_jax_generator.json"))
  assert m["family"] == "toy" and m["network"] == "dmd_jax.models.mlp.ToyGenerator"
  assert m["source"] == {**m["source"], "step": 5, "parameters": "params", "config": "configs/toy2d.py",
                         "workdir": str(workdir)}
  assert m["source"]["config_overrides"]["generator.hidden"] == [16, 16]

  # a non-empty destination is refused without --overwrite: exit 2, one line naming it
  p = export_cli(*args, "--step=3")
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
      f"error: --dst={dst} is not empty: pass --overwrite to replace it (it is replaced only once the new "
      "export is complete)")
  with np.load(dst / "generator.npz") as f:
    assert np.array_equal(f["mlp/out/kernel"], params["mlp/out/kernel"])


def test_toy_errors_and_atomic_replacement(toy_run, tmp_path, monkeypatch):
  config, workdir, saved = toy_run
  with pytest.raises(ValueError, match=r"--step=4: no such checkpoint in .*; available steps: 3, 5"):
    export.export(config, str(workdir), str(tmp_path / "a"), step=4)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty_run/checkpoints: train first"):
    export.export(config, str(empty), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    export.export(config, str(tmp_path / "missing"), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="--teacher_src is for Stable Diffusion runs"):
    export.export(config, str(workdir), str(tmp_path / "a"), teacher_src=str(tmp_path))
  with pytest.raises(ValueError, match="exports are written to a local folder"):
    export.export(config, str(workdir), "gs://bucket/export")
  with pytest.raises(ValueError, match="holds --workdir"):
    export.export(config, str(workdir), str(workdir.parent), overwrite=True)
  assert not os.path.exists(tmp_path / "a")

  dst = tmp_path / "export"
  export.export(config, str(workdir), str(dst), step=3)
  good = (dst / "generator.npz").read_bytes(), (dst / "dmd_jax_generator.json").read_bytes()

  # a failure in the middle of writing: the previous export stays, no temporary folder is left
  real_writer = export.WRITERS["toy"]

  def failing_writer(out_dir, run, params, teacher_src=None):
    real_writer(out_dir, run, params, teacher_src=teacher_src)   # the new npz is complete, the json not yet
    raise OSError("disk full (injected)")

  monkeypatch.setitem(export.WRITERS, "toy", failing_writer)
  with pytest.raises(OSError, match="injected"):
    export.export(config, str(workdir), str(dst), overwrite=True)
  assert ((dst / "generator.npz").read_bytes(), (dst / "dmd_jax_generator.json").read_bytes()) == good
  assert not leftovers(tmp_path)
  monkeypatch.setitem(export.WRITERS, "toy", real_writer)

  # --overwrite replaces it once the new one is complete
  export.export(config, str(workdir), str(dst), overwrite=True)
  assert json.load(open(dst / "dmd_jax_generator.json"))["source"]["step"] == 5
  with np.load(dst / "generator.npz") as f:
    assert np.array_equal(f["mlp/out/kernel"], saved[5][0]["mlp/out/kernel"])
  assert not leftovers(tmp_path)


def test_staged_folder_leftovers_of_a_killed_export(tmp_path):
  dead = 2 ** 22 + 12345   # above the default pid_max: no such process
  dst = tmp_path / "out"
  # killed while writing: its temporary folder is removed by the next export to the same place
  (tmp_path / f".out.export-tmp-{dead}-0a0b0c0d").mkdir()
  (tmp_path / f".other.export-tmp-{dead}-0a0b0c0d").mkdir()   # another destination's: kept
  with export_lib.staged_folder(str(dst)) as tmp:
    (open(os.path.join(tmp, "x"), "w")).write("1")
  assert (dst / "x").read_text() == "1"
  assert leftovers(tmp_path) == [f".other.export-tmp-{dead}-0a0b0c0d"]
  # killed between moving the old export aside and renaming the new one in: the old one is put back
  os.rename(dst, tmp_path / f".out.export-old-{dead}-0a0b0c0d")
  with pytest.raises(RuntimeError):
    with export_lib.staged_folder(str(dst)):
      assert (dst / "x").read_text() == "1"
      raise RuntimeError("stop")
  assert (dst / "x").read_text() == "1" and leftovers(tmp_path) == [f".other.export-tmp-{dead}-0a0b0c0d"]


def test_to_torch_inverts_from_torch():
  from dmd_jax.convert.common import from_torch, to_torch
  rng = np.random.default_rng(0)
  for leaf, shape in (("kernel", (5, 4, 3, 3)), ("kernel", (6, 7)), ("bias", (6,)), ("scale", (6,)),
                      ("embedding", (9, 4)), ("freqs", (8,))):
    w = rng.normal(size=shape).astype(np.float32)
    flax = from_torch(leaf, w)
    assert np.array_equal(to_torch(leaf, flax), w) and to_torch(leaf, flax).flags["C_CONTIGUOUS"]


def _numpy_mlp(w: dict, h: np.ndarray, n_hidden: int, prefix: str = "") -> np.ndarray:
  """The toy MLP as the export's json describes it, from the npz arrays alone."""
  silu = lambda x: x / (1.0 + np.exp(-x))
  for i in range(n_hidden):
    h = silu(h @ w[f"{prefix}mlp/dense{i}/kernel"] + w[f"{prefix}mlp/dense{i}/bias"])
  return h @ w[f"{prefix}mlp/out/kernel"] + w[f"{prefix}mlp/out/bias"]


def _numpy_later_step(w: dict, x_t: np.ndarray, s: float, sd: float) -> np.ndarray:
  """A later step of the multi-step toy generator as the json describes it: the mixture's exact denoiser plus
  c_out times the residual MLP of (u, its Fourier features, the noise embedding)."""
  m, std = w["teacher/means"], float(w["teacher/std"])
  v = std ** 2 + s ** 2
  logits = np.log(w["teacher/weights"])[None] - ((x_t[:, None] - m[None]) ** 2).sum(-1) / (2 * v)
  r = np.exp(logits - logits.max(1, keepdims=True))
  r /= r.sum(1, keepdims=True)
  d = (r[..., None] * (m[None] + std ** 2 / v * (x_t[:, None] - m[None]))).sum(1)
  u = x_t / np.sqrt(s ** 2 + sd ** 2)
  proj = 2 * np.pi * u @ w["refine/fourier_B"]
  arg = np.full((len(u), 1), np.log(s) / 4) * w["refine/noise_freqs"][None]
  h = np.concatenate([u, np.cos(proj), np.sin(proj), np.cos(arg), np.sin(arg)], axis=1)
  return d + s * sd / np.sqrt(s ** 2 + sd ** 2) * _numpy_mlp(w, h, 2, "refine/")


@pytest.mark.parametrize("steps", [(), (999, 499)])
def test_toy_json_describes_the_network(tmp_path, steps):
  config = load_config("toy2d", "", {**TOY_OVERRIDES, "generator.steps": steps})
  write_checkpoints(config, tmp_path / "run", [2], seed=2)
  m = export.export(config, str(tmp_path / "run"), str(tmp_path / "export"))
  with np.load(tmp_path / "export" / "generator.npz") as f:
    w = {k: f[k].astype(np.float64) for k in f.files}
  run = train.setup(config, str(tmp_path / "run"))
  params = export_lib.generator_network_params(run, modes.latest_generator(run, 2)[0])
  z = np.random.default_rng(0).normal(size=(5, 2))
  want = np.asarray(run.teacher.generate(params, jnp.asarray(z, jnp.float32), None))
  if not steps:
    assert m["num_steps"] == 1 and "ToyGenerator" in m["network"]
    got = _numpy_mlp(w, z, 2)
    assert rel_err(got, want) < 1e-5
    return
  assert m["num_steps"] == 2 and m["karras_timesteps"] == [999, 499] and "ToyDenoiserNet" in m["network"]
  assert m["sigmas"][0] == 80.0 and 0.002 < m["sigmas"][1] < 80.0
  assert rel_err(_numpy_mlp(w, z, 2, "first/"), want) < 1e-5      # the first step: an MLP of z
  # a later step, at a trained (non-zero) residual: the checkpoint's random weights, not the zero init
  assert np.abs(w["refine/mlp/out/kernel"]).max() > 0
  s, sd = m["sigmas"][1], m["sigma_data"]
  x_t = np.random.default_rng(1).normal(size=(5, 2))
  want = np.asarray(run.teacher.generate_at(params, jnp.asarray(x_t, jnp.float32), jnp.full((5,), 499), None))
  got = _numpy_later_step(w, x_t, s, sd)
  assert rel_err(got, want) < 1e-5


def test_multistep_timesteps_and_sigmas():
  sd = load_config("coco", "tiny", {"generator.steps": (999, 749, 499, 249)})
  assert sd_export._sd_timesteps(sd) == [999, 749, 499, 249]
  assert sd_export._sd_timesteps(load_config("coco", "tiny")) == [999]
  edm = load_config("cifar10", "tiny", {"generator.steps": (999, 499)})
  from dmd_jax.schedules import from_config
  assert edm_export._edm_sigmas(edm) == [80.0, float(from_config(edm.schedule).sigmas[499])]


def test_sd_teacher_src_checks(tmp_path):
  """``--teacher_src`` must be a diffusers SD folder (checked before anything is read) of this teacher's UNet."""
  from dmd_jax.schedules import VPSchedule
  config = load_config("coco", "tiny", SD_OVERRIDES)
  (tmp_path / "src" / "vae").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"not a diffusers StableDiffusionPipeline folder: no text_encoder/, "
                                              r"tokenizer/, scheduler/"):
    export.export(config, str(tmp_path / "run"), str(tmp_path / "out"), teacher_src=str(tmp_path / "src"))
  assert not os.path.exists(tmp_path / "out")
  (tmp_path / "src" / "unet").mkdir()
  (tmp_path / "src" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 24, "_x": 1}))
  with pytest.raises(ValueError, match="differs from the run's teacher UNet on cross_attention_dim"):
    sd_export._copy_pipeline(str(tmp_path / "src"), str(tmp_path / "out"), {"cross_attention_dim": 32},
                             VPSchedule(), sd_export.SD)


@pytest.mark.parametrize("name", ["edm_ncsnpp_uncond", "edm_adm_cond"])
def test_edm_to_torch_state_dict_round_trip(name):
  """NCSN++ (Fourier ``freqs``) and ADM (DhariwalUNet) fixture state dicts (DDPM++: the export test above) →
  Flax → back: the same keys and values, resample filters included."""
  import fixture_testing as ft
  from dmd_jax.families.edm import convert as edm_convert
  want, init_kwargs = ft.params_of(ft.load_fixture(name)), ft.edm_init_kwargs(name)
  _, params = edm_convert.convert_state_dict(want, init_kwargs)
  got = edm_convert.to_torch_state_dict(params, init_kwargs)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
