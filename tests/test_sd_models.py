"""Parity of the Flax Stable Diffusion networks with diffusers / transformers (PyTorch, float32, eval) on
tiny random configurations, converted through ``dmd_jax.families.sd.convert``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sd_testing as st
from dmd_jax.families.sd import convert as sdc
from dmd_jax.models import unet2d

torch = pytest.importorskip("torch")


def _convert(build, torch_model, **kw):
  config = torch_model.config
  module, inputs = build(config.to_dict() if hasattr(config, "to_dict") else dict(config), **kw)
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  return module, sdc.convert_state_dict(sd, sdc.expected_shapes(module, inputs), "test")


def _unet_inputs(cfg, h, w, batch=2, tokens=5):
  rng = np.random.RandomState(0)
  x = rng.randn(batch, cfg["in_channels"], h, w).astype(np.float32)
  ctx = rng.randn(batch, tokens, cfg["cross_attention_dim"]).astype(np.float32)
  t = np.array([999, 17][:batch])
  return x, t, ctx


def _torch_eps(model, x, t, ctx):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)


# (name, config, latent size, remat): the SD1 case uses an odd latent size,
# which exercises diffusers' forwarded upsample sizes; remat must not change the forward pass.
@pytest.mark.parametrize("name,config,hw,remat", [
    ("sd1", st.UNET_SD1, (9, 6), False),
    ("sd2", st.UNET_SD2, (8, 8), True),
])
def test_unet_parity(name, config, hw, remat):
  model = st.torch_unet(config)
  module, params = _convert(sdc.build_unet, model, remat=remat)
  x, t, ctx = _unet_inputs(config, *hw)
  captured = {}
  hook = model.mid_block.register_forward_hook(lambda m, args, out: captured.update(mid=out))
  ref = _torch_eps(model, x, t, ctx)
  hook.remove()
  eps, mid = jax.jit(lambda p, *a: module.apply({"params": p}, *a, return_mid_features=True))(
      params, x.transpose(0, 2, 3, 1), t, ctx)
  err = st.rel_err(eps, ref)
  print(f"unet {name}: rel err {err:.2e}")
  assert eps.dtype == jnp.float32 and eps.shape == ref.shape
  assert err <= 1e-5
  n_down = len(config["block_out_channels"]) - 1
  h, w = hw
  for _ in range(n_down):
    h, w = (h + 1) // 2, (w + 1) // 2
  assert mid.shape == (2, h, w, config["block_out_channels"][-1])
  # the mid-block output is DMD2's GAN-head input (docs/method.md §7): diffusers' mid_block output
  mid_err = st.rel_err(mid, captured["mid"].numpy().transpose(0, 2, 3, 1))
  print(f"unet {name}: mid-block rel err {mid_err:.2e}")
  assert mid_err <= 1e-5


def test_unet_bf16_and_scalar_timestep():
  config = st.UNET_SD1
  model = st.torch_unet(config)
  module, params = _convert(sdc.build_unet, model, dtype=jnp.bfloat16)
  x, t, ctx = _unet_inputs(config, 8, 8, batch=2)
  t[:] = 500  # a scalar timestep is broadcast over the batch
  ref = _torch_eps(model, x, t, ctx)
  eps, mid = jax.jit(lambda p, *a: module.apply({"params": p}, *a, return_mid_features=True))(
      params, x.transpose(0, 2, 3, 1), jnp.float32(500), ctx)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert eps.dtype == jnp.float32 and mid.dtype == jnp.bfloat16
  err = st.rel_err(eps, ref)
  print(f"unet sd1 bf16: rel err {err:.2e}")
  assert err < 5e-2


def test_vae_parity():
  model = st.torch_vae()
  module, params = _convert(sdc.build_vae, model)
  rng = np.random.RandomState(3)
  z = rng.randn(2, 4, 6, 5).astype(np.float32)
  img = np.tanh(rng.randn(2, 3, 16, 12)).astype(np.float32)
  with torch.no_grad():
    ref_dec = model.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    ref_enc = model.encode(torch.from_numpy(img)).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
  dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, z.transpose(0, 2, 3, 1))
  enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, img.transpose(0, 2, 3, 1))
  e_dec, e_enc = st.rel_err(dec, ref_dec), st.rel_err(enc, ref_enc)
  print(f"vae: decode rel err {e_dec:.2e}, encode rel err {e_enc:.2e}")
  assert dec.shape == (2, 12, 10, 3) and enc.shape == (2, 8, 6, 4)
  assert e_dec <= 1e-5 and e_enc <= 1e-5
  assert module.config.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_parity(act):
  model = st.torch_clip(dict(st.CLIP, hidden_act=act))
  module, params = _convert(sdc.build_text_encoder, model)
  ids = np.random.RandomState(4).randint(0, 62, size=(2, 12))
  ids[:, 0], ids[0, 7:], ids[1, 11] = 62, 63, 63  # bos ... eos (+ padding with eos)
  with torch.no_grad():
    out = model(torch.from_numpy(ids))
  hidden, pooled = jax.jit(lambda p, i: module.apply({"params": p}, i, return_pooled=True))(params, ids)
  e_h, e_p = st.rel_err(hidden, out.last_hidden_state.numpy()), st.rel_err(pooled, out.pooler_output.numpy())
  print(f"clip text ({act}): rel err {e_h:.2e} (pooled {e_p:.2e})")
  assert e_h <= 1e-5 and e_p <= 1e-5


def test_unsupported_config_values_are_named():
  with pytest.raises(ValueError, match="class_embed_type='timestep'"):
    unet2d.UNetConfig.from_diffusers(dict(st.UNET_SD1, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    unet2d.UNetConfig.from_diffusers(dict(st.UNET_SD1, down_block_types=(
        "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")))
  with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
    unet2d.UNetConfig.from_diffusers(dict(st.UNET_SD1, addition_embed_type="text_time"))
  with pytest.raises(ValueError, match="unknown key frobnicate=1"):
    unet2d.UNetConfig.from_diffusers(dict(st.UNET_SD1, frobnicate=1))
  cfg = unet2d.UNetConfig.from_diffusers(dict(st.UNET_SD2, _class_name="UNet2DConditionModel"))
  assert cfg.num_heads == (2, 4) and cfg.use_linear_projection and cfg.transformer_layers_per_block == (2, 2)


# The released configurations (dmd_jax.families.sd.convert.SD15_* / SD2_UNET), traced abstractly.
def test_released_configurations():
  counts = {}
  for name, build, cfg in (("unet", sdc.build_unet, sdc.SD15_UNET), ("vae", sdc.build_vae, sdc.SD15_VAE),
                           ("text", sdc.build_text_encoder, sdc.SD15_TEXT),
                           ("unet2", sdc.build_unet, sdc.SD2_UNET)):
    module, inputs = build(cfg)
    counts[name] = sum(int(np.prod(s)) for s in sdc.expected_shapes(module, inputs).values())
  assert counts == dict(unet=859_520_964, vae=83_653_863, text=123_060_480, unet2=865_910_724)
  module, inputs = sdc.build_unet(sdc.SD15_UNET)
  params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
  eps, mid = jax.eval_shape(
      lambda p, x, c: module.apply(p, x, 999, c, return_mid_features=True), params,
      jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32), jax.ShapeDtypeStruct((2, 77, 768), jnp.float32))
  assert eps.shape == (2, 64, 64, 4) and mid.shape == (2, 8, 8, 1280)  # DMD2's GAN head input: 1280x8x8
