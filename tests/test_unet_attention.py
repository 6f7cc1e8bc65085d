"""The attention kernel choice (``dmd_jax.models.attention``): the fused call uses the same layout and scale as
the XLA path; on a CPU 'auto' is the XLA path and 'cudnn' is an error that says so; the choice given to a
network reaches its attention calls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.convert import clip as clip_convert
from dmd_jax.families.sd import convert as sdc
from dmd_jax.models import attention
from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs


def _qkv(dtype, n=64, m=77, heads=8, d=40, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(2, n, heads * d)), dtype)
  k = jnp.asarray(r.normal(size=(2, m, heads * d)), dtype)
  v = jnp.asarray(r.normal(size=(2, m, heads * d)), dtype)
  return q, k, v


def test_xla_path_matches_jax():
  # our einsum-softmax-einsum = jax.nn.dot_product_attention's XLA implementation at scale d**-0.5
  q, k, v = _qkv(jnp.float32)
  ours = attention.dot_product_attention(q, k, v, 8)
  b, n, _ = q.shape
  split = lambda a: a.reshape(b, a.shape[1], 8, 40)
  ref = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=40 ** -0.5, implementation="xla")
  np.testing.assert_allclose(ours, ref.reshape(b, n, 320), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, 8, upcast=True), ours, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(ours - attention.dot_product_attention(q, k, v, 4)).max()) > 1e-3  # heads matter


def test_fused_call_matches_the_xla_path(monkeypatch):
  # The fused branch, run as on a GPU with cuDNN swapped for jax's XLA implementation (in float32): the
  # layout and scale it passes give the XLA path's result.
  real = jax.nn.dot_product_attention
  calls = []

  def fake(q, k, v, *, scale, implementation):
    calls.append((q.shape, implementation))
    f32 = lambda a: a.astype(jnp.float32)
    return real(f32(q), f32(k), f32(v), scale=scale, implementation="xla")

  q, k, v = _qkv(jnp.bfloat16)
  want = attention.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 8)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for impl in ("auto", "cudnn"):
    np.testing.assert_allclose(attention.dot_product_attention(q, k, v, 8, impl=impl), want, rtol=1e-5, atol=1e-5)
  assert calls == [((2, 64, 8, 40), "cudnn")] * 2
  attention.dot_product_attention(q, k, v, 8, upcast=True)              # 'auto' keeps upcast attention on XLA
  attention.dot_product_attention(q, k, v, 8, impl="xla")
  assert len(calls) == 2
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, 8, upcast=True, impl="cudnn"), want,
                             rtol=1e-5, atol=1e-5)
  assert len(calls) == 3


def test_choice_on_cpu():
  assert jax.default_backend() == "cpu"
  q, k, v = _qkv(jnp.bfloat16)
  xla = attention.dot_product_attention(q, k, v, 8, impl="xla")
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, 8), xla)   # auto = XLA on a CPU
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, 8, impl="auto"), xla)
  for upcast in (False, True):
    with pytest.raises(RuntimeError, match="attention='cudnn' needs cuDNN on a GPU"):
      attention.dot_product_attention(q, k, v, 8, upcast=upcast, impl="cudnn")
  q32, k32, v32 = _qkv(jnp.float32)
  attention.dot_product_attention(q32, k32, v32, 8, impl="cudnn")     # float32 always takes the XLA path
  mask = jnp.zeros((64, 77), jnp.float32)
  attention.dot_product_attention(q, k, v, 8, mask=mask, impl="cudnn")  # and so does masked attention
  with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'xla', 'cudnn', 'splash'\), got 'flash'"):
    attention.dot_product_attention(q, k, v, 8, impl="flash")


def test_choice_reaches_the_networks():
  # bf16 activations: 'cudnn' must reach every attention call (an error on a CPU); 'xla' runs.
  init = lambda m, inputs: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), *inputs))
  unet, inputs = sdc.build_unet(sdc.TINY_UNET, dtype=jnp.bfloat16, attention="xla")
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), *inputs)["params"]
  out = unet.apply({"params": params}, *inputs)
  assert out.shape == inputs[0].shape and bool(jnp.isfinite(out).all())
  for remat in (False, True):
    cudnn = sdc.build_unet(sdc.TINY_UNET, dtype=jnp.bfloat16, remat=remat, attention="cudnn")[0]
    with pytest.raises(RuntimeError, match="attention='cudnn'"):
      jax.eval_shape(lambda: cudnn.apply({"params": params}, *inputs))
  vae, vae_in = sdc.build_vae(sdc.TINY_VAE, dtype=jnp.bfloat16, attention="cudnn")
  with pytest.raises(RuntimeError, match="attention='cudnn'"):
    init(vae, vae_in)
  init(vae.clone(attention="xla"), vae_in)
  clip, clip_in = clip_convert.build_clip(clip_convert.TINY_CLIP_MODEL, dtype=jnp.bfloat16, attention="cudnn")
  with pytest.raises(RuntimeError, match="attention='cudnn'"):    # the vision tower (the text tower is masked)
    init(clip, clip_in)
  init(clip.clone(attention="xla"), clip_in)
  edm = edm_module_from_kwargs(dict(img_resolution=8, img_channels=3, model_type="DhariwalUNet", model_channels=64,
                                    channel_mult=[1], num_blocks=1, attn_resolutions=[8]),
                               dtype=jnp.bfloat16, attention="cudnn")
  with pytest.raises(RuntimeError, match="attention='cudnn'"):
    init(edm, init_inputs(edm))
  init(edm.clone(attention="xla"), init_inputs(edm))


def test_builders_name_a_bad_choice():
  with pytest.raises(ValueError, match="attention must be one of .* got 'flash'"):
    sdc.build_unet(sdc.TINY_UNET, attention="flash")
  with pytest.raises(ValueError, match="got 'flash'"):
    sdc.build_vae(sdc.TINY_VAE, attention="flash")
  with pytest.raises(ValueError, match="got 'flash'"):
    edm_module_from_kwargs(dict(img_resolution=8, img_channels=3), attention="flash")
