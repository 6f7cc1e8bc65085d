"""Parity of the Flax Stable Diffusion XL networks with diffusers / transformers (PyTorch, float32, eval) on tiny
random configurations: the ``text_time`` UNet, both CLIP text encoders' penultimate states and the second one's
``text_embeds``, the VAE decoder with SDXL's config, and ``StableDiffusionXLPipeline.encode_prompt`` through a folder
converted by ``dmd_jax.families.sdxl.convert``; the converter's command line without torch and its errors; the
released configurations traced abstractly."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sdxl_testing as xt
from fixture_testing import rel_err
from dmd_jax.convert.common import ConversionError, flatten_params
from dmd_jax.families.sd import convert as sdc
from dmd_jax.families.sdxl import convert as sdxlc
from dmd_jax.models import unet2d

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_IDS = np.array([[16, 16, 0, 0, 16, 16], [1024, 768, 32, 0, 1024, 1024]], np.float32)


def _convert(build, torch_model, **kw):
  config = torch_model.config
  module, inputs = build(config.to_dict() if hasattr(config, "to_dict") else dict(config), **kw)
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  return module, sdc.convert_state_dict(sd, sdc.expected_shapes(module, inputs), "test")


def _torch_eps(model, x, t, ctx, pooled, time_ids, hook_mid=False):
  captured = {}
  hook = model.mid_block.register_forward_hook(lambda m, args, out: captured.update(mid=out)) if hook_mid else None
  with torch.no_grad():
    eps = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(np.asarray(ctx)),
                added_cond_kwargs={"text_embeds": torch.from_numpy(np.asarray(pooled)),
                                   "time_ids": torch.from_numpy(time_ids)}).sample.numpy().transpose(0, 2, 3, 1)
  if hook:
    hook.remove()
    return eps, captured["mid"].numpy().transpose(0, 2, 3, 1)
  return eps


def _ids(eos_pad: int, length: int = 12):
  """Two prompts' ids: bos, words, eos, then padding with ``eos_pad`` (the second prompt fills the row)."""
  ids = np.random.RandomState(4).randint(0, 56, size=(2, length))
  ids[:, 0], ids[0, 6], ids[0, 7:], ids[1, -1] = 62, 63, eos_pad, 63
  return ids


def test_unet_text_time_parity():
  model = xt.torch_unet(xt.UNET_XL)
  module, params = _convert(sdc.build_unet, model)
  rng = np.random.RandomState(0)
  x = rng.randn(2, 4, 8, 12).astype(np.float32)
  ctx = rng.randn(2, 5, xt.UNET_XL["cross_attention_dim"]).astype(np.float32)
  pooled = rng.randn(2, xt.CLIP_G["projection_dim"]).astype(np.float32)
  t = np.array([999, 17])
  ref, ref_mid = _torch_eps(model, x, t, ctx, pooled, TIME_IDS, hook_mid=True)
  run = jax.jit(lambda p, *a, c: module.apply({"params": p}, *a, added_cond=c, return_mid_features=True))
  eps, mid = run(params, x.transpose(0, 2, 3, 1), t, ctx, c={"text_embeds": pooled, "time_ids": TIME_IDS})
  err, mid_err = rel_err(eps, ref), rel_err(mid, ref_mid)
  print(f"unet text_time: rel err {err:.2e}, mid-block rel err {mid_err:.2e}")
  assert eps.dtype == jnp.float32 and eps.shape == ref.shape and mid.shape == (2, 2, 3, 32)
  assert err <= 1e-5 and mid_err <= 1e-5
  # The added conditioning moves the output (it is not silently dropped), and is required.
  other, _ = run(params, x.transpose(0, 2, 3, 1), t, ctx, c={"text_embeds": pooled, "time_ids": TIME_IDS[::-1].copy()})
  assert rel_err(other, ref) > 1e-3
  with pytest.raises(ValueError, match="addition_embed_type='text_time'.*added_cond"):
    module.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 72"):
    module.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx,
                 added_cond={"text_embeds": pooled[:, :20], "time_ids": TIME_IDS})


def test_unet_config_text_time():
  cfg = unet2d.UNetConfig.from_diffusers(dict(xt.UNET_XL, _class_name="UNet2DConditionModel"))
  assert (cfg.addition_embed_type, cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) == (
      "text_time", 8, 72)
  assert cfg.num_heads == (1, 2, 4) and cfg.transformer_layers_per_block == (1, 2, 3)
  with pytest.raises(ValueError, match="addition_embed_type='text'"):
    unet2d.UNetConfig.from_diffusers(dict(xt.UNET_XL, addition_embed_type="text"))
  with pytest.raises(ValueError, match="addition_time_embed_dim=None"):
    unet2d.UNetConfig.from_diffusers(dict(xt.UNET_XL, addition_time_embed_dim=None))
  plain = unet2d.UNetConfig.from_diffusers(dict(xt.UNET_XL, addition_embed_type=None))  # diffusers ignores the dims
  assert plain.addition_embed_type is None and plain.projection_class_embeddings_input_dim is None
  module = unet2d.UNet2DConditionModel(plain)
  with pytest.raises(ValueError, match="without addition_embed_type"):
    jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *unet2d.dummy_inputs(plain),
                                       added_cond={"text_embeds": jnp.zeros((1, 24)), "time_ids": jnp.zeros((1, 6))}))


def test_clip_text_penultimate_parity():
  model = xt.torch_clip_text()
  module, params = _convert(sdc.build_text_encoder, model)
  ids = _ids(eos_pad=63)
  with torch.no_grad():
    out = model(torch.from_numpy(ids), output_hidden_states=True)
  penultimate, pooled = jax.jit(lambda p, i: module.apply({"params": p}, i, return_pooled=True, hidden_layer=-2))(
      params, ids)
  first = jax.jit(lambda p, i: module.apply({"params": p}, i, hidden_layer=1))(params, ids)
  e_pen = rel_err(penultimate, out.hidden_states[-2].numpy())
  e_pool = rel_err(pooled, out.pooler_output.numpy())
  e_first = rel_err(first, out.hidden_states[1].numpy())
  print(f"clip text (SDXL text_encoder): penultimate rel err {e_pen:.2e}, pooled {e_pool:.2e}, layer 1 {e_first:.2e}")
  assert penultimate.dtype == jnp.float32 and max(e_pen, e_pool, e_first) <= 1e-5
  with pytest.raises(ValueError, match="hidden_layer=4 is out of range"):
    module.apply({"params": params}, ids, hidden_layer=4)


@pytest.mark.parametrize("eos_token_id", [63, 2])   # 2: the legacy configs' rule (argmax of the ids)
def test_clip_text_with_projection_parity(eos_token_id):
  model = xt.torch_clip_projection(dict(xt.CLIP_G, eos_token_id=eos_token_id))
  module, params = _convert(sdc.build_text_encoder_with_projection, model)
  assert sorted(params) == ["text_model", "text_projection"]
  ids = _ids(eos_pad=56)
  with torch.no_grad():
    out = model(torch.from_numpy(ids), output_hidden_states=True)
  (penultimate, embeds), (last, embeds_last) = jax.jit(lambda p, i: (
      module.apply({"params": p}, i, hidden_layer=-2), module.apply({"params": p}, i)))(params, ids)
  e_pen = rel_err(penultimate, out.hidden_states[-2].numpy())
  e_emb = rel_err(embeds, out.text_embeds.numpy())
  e_last = rel_err(last, out.last_hidden_state.numpy())
  print(f"clip text with projection (eos {eos_token_id}): penultimate rel err {e_pen:.2e}, text_embeds {e_emb:.2e}, "
        f"last {e_last:.2e}")
  assert embeds.shape == (2, xt.CLIP_G["projection_dim"]) and embeds.dtype == jnp.float32
  assert max(e_pen, e_emb, e_last) <= 1e-5
  np.testing.assert_array_equal(embeds, embeds_last)


def test_vae_decode_parity_sdxl_config():
  model = xt.torch_vae(xt.VAE_XL)
  module, params = _convert(sdc.build_vae, model)
  assert module.config.scaling_factor == pytest.approx(0.13025)
  z = np.random.RandomState(3).randn(2, 4, 6, 5).astype(np.float32)
  with torch.no_grad():
    ref = model.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
  img = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, z.transpose(0, 2, 3, 1))
  err = rel_err(img, ref)
  print(f"vae (SDXL config): decode rel err {err:.2e}")
  assert img.shape == (2, 12, 10, 3) and err <= 1e-5


# ------------------------------------------------------------------------------------------ the converter

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
  return path, xt.write_pipeline(path)


@pytest.fixture(scope="module")
def converted(folder):
  return sdxlc.convert_pipeline(folder[0])


def test_encode_prompt_and_unet_through_converter(folder, converted):
  """The converted folder reproduces ``StableDiffusionXLPipeline.encode_prompt`` (both encoders' penultimate
  states concatenated, the second one's ``text_embeds`` pooled) and the UNet on that conditioning."""
  _, pipe = folder
  assert set(converted) >= set(sdxlc.NETWORKS) | set(sdxlc.TOKENIZERS)
  assert converted["scheduler_config"]["_class_name"] == "EulerDiscreteScheduler"
  assert converted["scheduler_config"]["beta_schedule"] == "scaled_linear"
  assert converted["configs"]["vae"]["scaling_factor"] == pytest.approx(0.13025)
  prompts = ["a red bus", ""]
  with torch.no_grad():
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
  ids = sdxlc.tokenize(converted["tokenizer"], prompts)
  ids_2 = sdxlc.tokenize(converted["tokenizer_2"], prompts)
  assert ids.tolist() == pipe.tokenizer(prompts, padding="max_length", max_length=16).input_ids
  assert ids_2.tolist() == pipe.tokenizer_2(prompts, padding="max_length", max_length=16).input_ids
  assert ids[0, :6].tolist() == [62, 26, 53, 55, 63, 63] and ids_2[0, :6].tolist() == [62, 26, 53, 55, 63, 56]
  embeds, pooled = jax.jit(lambda i, j: sdxlc.encode_prompt(converted["text_encoder"], converted["text_encoder_2"],
                                                            i, j))(ids, ids_2)
  assert embeds.shape == (2, 16, 48) and pooled.shape == (2, 24)
  e_embeds, e_pooled = rel_err(embeds, ref_embeds.numpy()), rel_err(pooled, ref_pooled.numpy())

  rng = np.random.RandomState(1)
  x = rng.randn(2, 4, 8, 8).astype(np.float32)
  t = np.array([999, 250])
  time_ids = np.stack([sdxlc.time_ids((64, 64)), sdxlc.time_ids((48, 80), (8, 0), (64, 64))])
  ref_eps = _torch_eps(pipe.unet, x, t, ref_embeds.numpy(), ref_pooled.numpy(), time_ids)
  unet, unet_params = converted["unet"]
  eps = jax.jit(lambda p, *a: unet.apply({"params": p}, *a))(
      unet_params, x.transpose(0, 2, 3, 1), t, embeds, {"text_embeds": pooled, "time_ids": time_ids})
  e_eps = rel_err(eps, ref_eps)
  print(f"converted SDXL folder: prompt_embeds rel err {e_embeds:.2e}, pooled {e_pooled:.2e}, unet eps {e_eps:.2e}")
  assert max(e_embeds, e_pooled, e_eps) <= 1e-5


def _assert_same_params(a, b):
  fa, fb = flatten_params(jax.device_get(a)), flatten_params(jax.device_get(b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_command_line_and_random_pipeline_without_torch(tmp_path, folder, converted):
  """``python -m dmd_jax.convert sdxl`` and ``write_random_converted`` with torch unavailable; the command's folder
  loads (``load_converted_sdxl``) to the parameters converted in-process."""
  dst, rand = str(tmp_path / "cli"), str(tmp_path / "random")
  code = ("import sys; sys.modules['torch'] = None; from dmd_jax.convert.__main__ import main; "
          "from dmd_jax.families.sdxl import convert as c; "
          f"code = main(['sdxl', '--src={folder[0]}', '--dst={dst}']); c.write_random_converted({rand!r}, seed=3); "
          f"x = c.load_converted_sdxl({rand!r}); print(c.tokenize(x['tokenizer_2'], 'a red bus')[0, :6].tolist()); "
          "sys.exit(code)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "text_encoder_2:" in proc.stdout and "[62, 26, 53, 55, 63, 56]" in proc.stdout
  want = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
  assert sorted(os.listdir(dst)) == want and sorted(os.listdir(rand)) == want
  loaded = sdxlc.load_converted_sdxl(dst)
  for name in sdxlc.NETWORKS:
    assert loaded[name][0] == converted[name][0]
    _assert_same_params(loaded[name][1], converted[name][1])
    assert loaded["configs"][name] == converted["configs"][name]
  assert loaded["tokenizer_2"]("a red bus").input_ids == converted["tokenizer_2"]("a red bus").input_ids


def _copy_tree(src, dst, copy=()):
  os.makedirs(dst)
  for name in os.listdir(src):
    (shutil.copytree if name in copy else os.symlink)(os.path.join(src, name), os.path.join(dst, name))
  return dst


def test_missing_keys_are_named(tmp_path, folder):
  broken = _copy_tree(folder[0], str(tmp_path / "broken"), copy=("unet", "text_encoder_2"))
  for name, key in (("unet", "add_embedding.linear_1.weight"), ("text_encoder_2", "text_projection.weight")):
    path = os.path.join(broken, name, "diffusion_pytorch_model.safetensors" if name == "unet" else "model.safetensors")
    sd = load_file(path)
    del sd[key]
    save_file(sd, path)
  with pytest.raises(ConversionError, match=r"unet \(.*\): missing keys \(1\): add_embedding\.linear_1\.weight"):
    sdxlc.convert_pipeline(broken)
  with pytest.raises(ConversionError, match=r"text_encoder_2 \(.*\): missing keys \(1\): text_projection\.weight"):
    sdc.convert_network(broken, "text_encoder_2", kind="text_encoder_with_projection")


def test_inconsistent_configs_are_named():
  configs = {"unet": dict(xt.UNET_XL), "text_encoder": xt.CLIP_L, "text_encoder_2": xt.CLIP_G}
  sdxlc.check_configs(configs)
  with pytest.raises(ConversionError, match="cross_attention_dim=40.*16 \\+ 32 = 48"):
    sdxlc.check_configs(dict(configs, unet=dict(xt.UNET_XL, cross_attention_dim=40)))
  with pytest.raises(ConversionError, match="projection_dim 20 .* = 68"):
    sdxlc.check_configs(dict(configs, text_encoder_2=dict(xt.CLIP_G, projection_dim=20)))
  with pytest.raises(ConversionError, match="addition_embed_type=None"):
    sdxlc.check_configs(dict(configs, unet=dict(xt.UNET_XL, addition_embed_type=None)))


# The released SDXL base 1.0 configurations (dmd_jax.families.sdxl.convert.SDXL_*), traced abstractly; the counts
# are those of diffusers' UNet2DConditionModel / transformers' CLIP modules built from the same configs.
def test_released_configurations():
  counts, abstract = {}, {}
  for name, build, cfg in (("unet", sdc.build_unet, sdxlc.SDXL_UNET), ("vae", sdc.build_vae, sdxlc.SDXL_VAE),
                           ("text", sdc.build_text_encoder, sdxlc.SDXL_TEXT),
                           ("text_2", sdc.build_text_encoder_with_projection, sdxlc.SDXL_TEXT_2)):
    module, inputs = build(cfg)
    abstract[name] = module, jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    counts[name] = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract[name][1]))
  assert counts == dict(unet=2_567_463_684, vae=83_653_863, text=123_060_480, text_2=694_659_840)
  sdxlc.check_configs({"unet": sdxlc.SDXL_UNET, "text_encoder": sdxlc.SDXL_TEXT, "text_encoder_2": sdxlc.SDXL_TEXT_2})
  module, params = abstract["unet"]
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  eps, mid = jax.eval_shape(
      lambda p, x, c, a: module.apply(p, x, 999, c, added_cond=a, return_mid_features=True), params,
      f32(2, 128, 128, 4), f32(2, 77, 2048), {"text_embeds": f32(2, 1280), "time_ids": f32(2, 6)})
  assert eps.shape == (2, 128, 128, 4) and mid.shape == (2, 32, 32, 1280)
