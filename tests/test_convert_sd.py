"""``dmd_jax.families.sd.convert`` on tiny Stable Diffusion folders in diffusers layout (written by ``save_pretrained``):
parity of the converted networks, ``.bin`` vs ``.safetensors``, the saved/loaded folder, the command line
without torch, and the errors for broken folders."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import sd_testing as st
from dmd_jax.families.sd import convert as sdc
from dmd_jax.convert.common import ConversionError, flatten_params, load_converted

import torch  # the test extra installs it: a missing torch must fail, not skip
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sd") / "tiny-sd")
  models = st.write_pipeline(path, st.UNET_SD2)
  return path, models


@pytest.fixture(scope="module")
def converted(folder):
  return sdc.convert_pipeline(folder[0])


def _assert_same_params(a, b):
  fa, fb = flatten_params(jax.device_get(a)), flatten_params(jax.device_get(b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_convert_pipeline_parity(folder, converted):
  path, (unet, vae, text, tok) = folder
  assert set(converted) >= {"unet", "vae", "text_encoder", "tokenizer"}
  assert converted["scheduler_config"]["beta_schedule"] == "scaled_linear"
  assert converted["configs"]["vae"]["scaling_factor"] == pytest.approx(0.18215)

  # Tokenizer (from vocab.json / merges.txt) and text encoder.
  prompts = ["a red bus", ""]
  ids = converted["tokenizer"](prompts, padding="max_length", max_length=16).input_ids
  assert ids == tok(prompts, padding="max_length", max_length=16).input_ids
  assert ids[0][:5] == [62, 26, 53, 55, 63]
  ids = np.asarray(ids)
  text_module, text_params = converted["text_encoder"]
  with torch.no_grad():
    ref_text = text(torch.from_numpy(ids)).last_hidden_state.numpy()
  hidden = jax.jit(lambda p, i: text_module.apply({"params": p}, i))(text_params, ids)
  e_text = st.rel_err(hidden, ref_text)

  # UNet, conditioned on the text encoder's output.
  rng = np.random.RandomState(0)
  x = rng.randn(2, 4, 8, 8).astype(np.float32)
  ctx = rng.randn(2, 16, st.UNET_SD2["cross_attention_dim"]).astype(np.float32)
  t = np.array([999, 250])
  with torch.no_grad():
    ref_eps = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
  unet_module, unet_params = converted["unet"]
  eps = jax.jit(lambda p, *a: unet_module.apply({"params": p}, *a))(unet_params, x.transpose(0, 2, 3, 1), t, ctx)
  e_unet = st.rel_err(eps, ref_eps.transpose(0, 2, 3, 1))

  # VAE decode (encode parity is in test_sd_models).
  z = rng.randn(1, 4, 4, 4).astype(np.float32)
  with torch.no_grad():
    ref_img = vae.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
  vae_module, vae_params = converted["vae"]
  img = jax.jit(lambda p, z: vae_module.apply({"params": p}, z, method="decode"))(vae_params, z.transpose(0, 2, 3, 1))
  e_vae = st.rel_err(img, ref_img)
  print(f"converted folder: unet {e_unet:.2e}, vae decode {e_vae:.2e}, text {e_text:.2e}")
  assert max(e_unet, e_vae, e_text) <= 1e-5


def test_bin_checkpoints_match_safetensors(tmp_path, converted):
  path = str(tmp_path / "tiny-sd-bin")
  st.write_pipeline(path, st.UNET_SD2, safe_serialization=False)  # same seeds, so the same weights
  assert os.path.exists(os.path.join(path, "unet", "diffusion_pytorch_model.bin"))
  assert os.path.exists(os.path.join(path, "text_encoder", "pytorch_model.bin"))
  assert not os.path.exists(os.path.join(path, UNET_FILE))
  conv = sdc.convert_pipeline(path)
  for name in sdc.NETWORKS:
    _assert_same_params(conv[name][1], converted[name][1])


def test_save_and_load_converted(tmp_path, converted):
  dst = str(tmp_path / "out")
  sdc.save_converted_sd(converted, dst)
  loaded = sdc.load_converted_sd(dst)
  for name in sdc.NETWORKS:
    assert loaded[name][0] == converted[name][0]  # same module (config, dtype)
    _assert_same_params(loaded[name][1], converted[name][1])
    assert loaded["configs"][name] == converted["configs"][name]
  assert loaded["scheduler_config"] == converted["scheduler_config"]
  assert loaded["tokenizer"]("a red bus").input_ids == converted["tokenizer"]("a red bus").input_ids
  # A damaged converted folder is reported, not silently loaded.
  os.remove(os.path.join(dst, "vae", "params.npz"))
  with pytest.raises(ConversionError, match="params.npz"):
    sdc.load_converted_sd(dst)


def test_command_line_without_torch(tmp_path, folder, converted):
  dst = str(tmp_path / "cli")
  code = ("import sys; sys.modules['torch'] = None; from dmd_jax.convert.__main__ import main; "
          f"sys.exit(main(['sd', '--src={folder[0]}', '--dst={dst}']))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "unet:" in proc.stdout
  params, _ = load_converted(os.path.join(dst, "unet"))
  _assert_same_params(params, converted["unet"][1])


# ----------------------------------------------------------------------------------------------- errors

def _copy_tree(src, dst, skip=()):
  """A cheap copy of a pipeline folder: subfolders symlinked, except the UNet which is copied."""
  os.makedirs(dst)
  for name in os.listdir(src):
    if name in skip:
      continue
    if name == "unet":
      shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    else:
      os.symlink(os.path.join(src, name), os.path.join(dst, name))
  return dst


def test_missing_subfolder_and_config(tmp_path, folder):
  broken = _copy_tree(folder[0], str(tmp_path / "no-vae"), skip=("vae",))
  with pytest.raises(ConversionError, match="no vae/ subfolder"):
    sdc.convert_pipeline(broken)
  os.remove(os.path.join(broken, "unet", "config.json"))
  with pytest.raises(ConversionError, match="missing config.*unet"):
    sdc.convert_network(broken, "unet")
  with pytest.raises(ConversionError, match="no such folder"):
    sdc.convert_pipeline(str(tmp_path / "nowhere"))


def test_missing_extra_and_misshaped_keys(tmp_path, folder):
  broken = _copy_tree(folder[0], str(tmp_path / "broken"))
  wpath = os.path.join(broken, UNET_FILE)
  sd = load_file(wpath)
  gone = "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
  bad = "down_blocks.0.resnets.0.conv1.weight"
  del sd[gone]
  sd[bad] = np.zeros((16, 16, 3, 1), np.float32)
  sd["mid_block.extra.weight"] = np.zeros((1,), np.float32)
  save_file(sd, wpath)
  with pytest.raises(ConversionError) as e:
    sdc.convert_network(broken, "unet")
  msg = str(e.value)
  assert f"missing keys (1): {gone}" in msg
  assert "unexpected keys (1): mid_block.extra.weight" in msg
  assert f"wrong shapes (1): {bad}: expected (16, 16, 3, 3), got (16, 16, 3, 1)" in msg


def test_unsupported_config_is_a_conversion_error(tmp_path, folder):
  broken = _copy_tree(folder[0], str(tmp_path / "cfg"))
  cpath = os.path.join(broken, "unet", "config.json")
  with open(cpath) as f:
    cfg = json.load(f)
  cfg["resnet_time_scale_shift"] = "scale_shift"
  with open(cpath, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ConversionError, match="unet/config.json.*resnet_time_scale_shift='scale_shift'"):
    sdc.convert_network(broken, "unet")


def test_older_file_formats(tmp_path, folder, converted):
  """Older VAE files name the mid-block attention query/key/value/proj_attn, and older CLIP files prefix
  their keys with `text_model.` and carry the position_ids buffer; they convert the same."""
  src = os.path.join(folder[0], "text_encoder")
  dst = str(tmp_path / "old" / "text_encoder")
  shutil.copytree(src, dst)
  wpath = os.path.join(dst, "model.safetensors")
  sd = {"text_model." + k: v for k, v in load_file(wpath).items()}
  sd["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  save_file(sd, wpath)
  _, params, _ = sdc.convert_network(str(tmp_path / "old"), "text_encoder")
  _assert_same_params(params, converted["text_encoder"][1])

  src = os.path.join(folder[0], "vae")
  dst = str(tmp_path / "old" / "vae")
  shutil.copytree(src, dst)
  wpath = os.path.join(dst, "diffusion_pytorch_model.safetensors")
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in load_file(wpath).items():
    for new, old in new_to_old.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    sd[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in sd
  save_file(sd, wpath)
  _, params, _ = sdc.convert_network(str(tmp_path / "old"), "vae")
  _assert_same_params(params, converted["vae"][1])


def test_random_pipeline_without_torch(tmp_path):
  """``write_random_pipeline`` (the ``:tiny`` teacher) writes a diffusers-layout folder that the converter reads,
  with torch unavailable; the tiny tokenizer is the one the parity tests use."""
  dst = str(tmp_path / "random")
  code = ("import sys; sys.modules['torch'] = None; from dmd_jax.families.sd import convert as sd; "
          f"sd.write_random_converted({dst!r}, seed=3); c = sd.load_converted_sd({dst!r}); "
          "print(c['tokenizer']('a red bus').input_ids, c['configs']['unet']['cross_attention_dim'])")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[62, 26, 53, 55, 63] 32" in proc.stdout
  assert os.path.exists(os.path.join(dst + "-source", UNET_FILE))
  assert sorted(os.listdir(dst)) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
