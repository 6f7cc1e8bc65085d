"""Splash attention (``attention='splash'``, the Pallas TPU flash-attention kernel; docs/attention.md): on the
CPU the same kernel in Pallas' interpret mode matches the XLA path (forward, upcast, bfloat16, gradients, an
EDM U-Net); the shapes it cannot take are errors that name them; under a ('data', 'fsdp') mesh of 8 emulated
devices the shard_map path equals the single call; lowered for a v5e slice under its mesh (a deviceless
topology, the default backend still the CPU) it is the compiled TPU kernel, its temporary memory a small
fraction of the XLA path's, and 'auto' takes it for SD's long self-attention only."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, env_with_devices

from dmd_jax.models import attention
from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs


def _qkv(dtype, b=2, n=256, m=None, heads=2, d=40, seed=0):
  r = np.random.default_rng(seed)
  m = n if m is None else m
  return tuple(jnp.asarray(r.normal(size=(b, t, heads * d)), dtype) for t in (n, m, m))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _attn(impl, heads=2, upcast=False):
  return jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, heads, upcast=upcast, impl=impl))


def _run_python(code: str, env: dict, timeout=240) -> dict:
  """Runs ``code`` in a fresh interpreter (its environment set before JAX starts); the last line of its output
  is a JSON object."""
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=timeout)
  if p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_interpret_forward_matches_xla():
  # float32: the same arithmetic up to summation order
  q, k, v = _qkv(jnp.float32)
  for upcast in (False, True):
    splash, xla = _attn("splash", upcast=upcast)(q, k, v), _attn("xla", upcast=upcast)(q, k, v)
    assert splash.dtype == jnp.float32
    assert _rel(splash, xla) <= 1e-5, (upcast, _rel(splash, xla))     # measured 4.6e-7
  # bfloat16 inputs: both paths are as far from the float32 result (splash's q is rounded after the scale,
  # XLA's probabilities are rounded to bfloat16 before the product with v)
  ref = _attn("xla")(q, k, v)
  qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
  for upcast in (False, True):
    splash, xla = _attn("splash", upcast=upcast)(qb, kb, vb), _attn("xla", upcast=upcast)(qb, kb, vb)
    assert splash.dtype == jnp.bfloat16
    assert _rel(splash, xla) <= 1e-2, (upcast, _rel(splash, xla))    # measured 3.3e-3 / 2.6e-3
    assert _rel(splash, ref) <= 1.5 * _rel(xla, ref) + 1e-3          # measured 3.9e-3 / 3.5e-3 vs 3.9e-3
  # cross attention (key length 384, a multiple of 128 other than the query's)
  q, k, v = _qkv(jnp.float32, n=128, m=384)
  assert _rel(_attn("splash")(q, k, v), _attn("xla")(q, k, v)) <= 1e-5    # measured 4.9e-7


def test_interpret_gradients_match_xla():
  q, k, v = _qkv(jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def grads(impl, upcast=False, dtype=jnp.float32):
    loss = lambda q, k, v: (attention.dot_product_attention(q, k, v, 2, upcast=upcast, impl=impl)
                            .astype(jnp.float32) * w).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(a.astype(dtype) for a in (q, k, v)))

  for name, s, x in zip("qkv", grads("splash"), grads("xla")):
    assert _rel(s, x) <= 1e-5, (name, _rel(s, x))                     # measured 4.4e-7 .. 5.0e-7
  # EDM's upcast attention on bfloat16 activations: float32 q and k into the kernel, bfloat16 gradients out
  for name, s, x in zip("qkv", grads("splash", True, jnp.bfloat16), grads("xla", True, jnp.bfloat16)):
    assert s.dtype == jnp.bfloat16 and _rel(s, x) <= 1e-2, (name, _rel(s, x))   # measured 2.6e-3


def test_edm_unet_with_splash_matches_xla():
  # DDPM++ at 16x16 with attention there: 256 tokens, one head of 16 channels, upcast (EDM's float32 q·k)
  kw = dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1],
            num_blocks=1, attn_resolutions=[16])
  edm = edm_module_from_kwargs(kw, attention="xla")
  x, sigma, labels = init_inputs(edm, batch=2)
  r = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * r.normal(size=s.shape), s.dtype),
                        jax.eval_shape(edm.init, jax.random.PRNGKey(0), x, sigma, labels))
  x = jnp.asarray(r.normal(size=x.shape), jnp.float32)
  splash = edm.clone(attention="splash")
  assert "pallas_call" in str(jax.make_jaxpr(splash.apply)(params, x, sigma, labels))
  ref = jax.jit(edm.apply)(params, x, sigma, labels)
  assert _rel(jax.jit(splash.apply)(params, x, sigma, labels), ref) <= 1e-5    # measured 1.3e-7


def test_choice_and_errors():
  assert attention.check_implementation("splash") == "splash"
  with pytest.raises(ValueError, match=r"one of \('auto', 'xla', 'cudnn', 'splash'\), got 'flash'"):
    attention.check_implementation("flash")
  assert attention.target_platform() == "cpu"
  q, k, v = _qkv(jnp.bfloat16, n=1024, heads=2)
  # on a CPU 'auto' is the XLA path, long self-attention included
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, 2),
                                attention.dot_product_attention(q, k, v, 2, impl="xla"))
  with pytest.raises(ValueError, match=r"takes no mask .*mask \(256, 256\)"):
    attention.dot_product_attention(*_qkv(jnp.float32), 2, mask=jnp.zeros((256, 256)), impl="splash")
  with pytest.raises(ValueError, match=r"multiples of 128 .*got N=200, M=200 \(q \(2, 200, 2, 40\)"):
    attention.dot_product_attention(*_qkv(jnp.float32, n=200), 2, impl="splash")
  with pytest.raises(ValueError, match=r"got N=256, M=77"):       # cross attention over CLIP's 77 tokens
    attention.dot_product_attention(*_qkv(jnp.float32, m=77), 2, impl="splash")


def test_gpu_is_an_error(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.target_platform() == "gpu"
  with pytest.raises(RuntimeError, match=r"attention='splash' is the Pallas TPU kernel .* platform is 'gpu'"):
    attention.dot_product_attention(*_qkv(jnp.float32), 2, impl="splash")


SHARDED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dmd_jax import sharding
from dmd_jax.models import attention

assert jax.device_count() == 8
mesh = sharding.make_mesh(2, 4)
r = np.random.default_rng(0)
q, k, v = (jnp.asarray(r.normal(size=(8, 256, 80)), jnp.float32) for _ in range(3))
fwd = lambda q, k, v: attention.dot_product_attention(q, k, v, 2, impl="splash")
grad = jax.grad(lambda q, k, v: (fwd(q, k, v) * q).sum(), argnums=(0, 1, 2))
single = jax.jit(fwd)(q, k, v), jax.jit(grad)(q, k, v)        # no mesh: one call on the whole batch
s = NamedSharding(mesh, P(sharding.BATCH_AXES))
put = lambda *a: [jax.device_put(x, s) for x in a]
with jax.set_mesh(mesh):
  platform = attention.target_platform()
  lowered = jax.jit(fwd, in_shardings=(s,) * 3, out_shardings=s).lower(q, k, v).as_text()
  out = jax.jit(fwd, in_shardings=(s,) * 3, out_shardings=s)(*put(q, k, v))
  grads = jax.jit(grad, in_shardings=(s,) * 3, out_shardings=(s,) * 3)(*put(q, k, v))
  try:
    jax.jit(fwd)(q[:6], k[:6], v[:6])
    error = None
  except ValueError as e:
    error = str(e)
print(json.dumps(dict(
    platform=platform, manual="sdy.manual_computation" in lowered, out_sharding=str(out.sharding.spec),
    fwd=float(jnp.abs(out - single[0]).max()),
    grad=[float(jnp.abs(a - b).max()) for a, b in zip(grads, single[1])], error=error)))
"""


def test_shard_map_on_8_devices_equals_one_call():
  res = _run_python(SHARDED, env_with_devices(8))
  assert res["platform"] == "cpu" and res["manual"], res
  assert res["fwd"] == 0.0 and res["grad"] == [0.0, 0.0, 0.0], res
  assert "batch of 6 does not split over the 8 devices" in res["error"], res


TPU = r"""
import json
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from dmd_jax import sharding
from dmd_jax.models import attention

MIB = 2 ** 20
devices = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices
out = dict(backend=jax.default_backend())

def lower(mesh, batch, impl, grad=False, m=4096, n=4096, spec=P(sharding.BATCH_AXES)):
  s = NamedSharding(mesh, spec)
  q = jax.ShapeDtypeStruct((batch, n, 320), jnp.bfloat16, sharding=s)
  kv = jax.ShapeDtypeStruct((batch, m, 320), jnp.bfloat16, sharding=s)
  fwd = lambda q, k, v: attention.dot_product_attention(q, k, v, 8, impl=impl)
  f = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)) if grad else fwd
  with jax.set_mesh(mesh):
    out["platform"] = attention.target_platform()
    return jax.jit(f, in_shardings=(s,) * 3, out_shardings=(s,) * 3 if grad else s).lower(q, kv, kv)

def temp_mib(lowered):
  return lowered.compile().memory_analysis().temp_size_in_bytes / MIB

kernel = lambda lowered: "tpu_custom_call" in lowered.as_text()
mesh4 = sharding.make_mesh(1, 4, devices=devices)          # data=1 x fsdp=4: one example per chip
splash = lower(mesh4, 4, "splash")
out["splash_kernel"], out["splash_manual"] = kernel(splash), "sdy.manual_computation" in splash.as_text()
out["splash_temp"], out["xla_temp"] = temp_mib(splash), temp_mib(lower(mesh4, 4, "xla"))
out["splash_grad_temp"] = temp_mib(lower(mesh4, 4, "splash", grad=True))
# 'auto' on the TPU: splash for SD's 4096-token self-attention only
out["auto"] = {name: kernel(lower(mesh4, 4, "auto", **kw)) for name, kw in
               dict(self4096=dict(), cross77=dict(m=77), self256=dict(n=256, m=256)).items()}
out["auto"]["batch2"] = kernel(lower(mesh4, 2, "auto", spec=P()))   # a batch that does not split: XLA
# SD's first level on one v5e chip: batch 1, forward and forward+backward (docs/attention.md)
mesh1 = sharding.make_mesh(1, 1, devices=devices[:1])
out["one_chip"] = {f"{impl}_{'grad' if g else 'fwd'}": temp_mib(lower(mesh1, 1, impl, grad=g))
                   for impl in ("xla", "splash") for g in (False, True)}
print(json.dumps(out))
"""


def test_tpu_compile_splash_kernel_and_memory():
  env = env_with_devices(None)
  # libtpu as a compile-only plugin (dmd_jax.plan.prepare_environment); several processes may load it at once
  env.update(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v5litepod-8",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  res = _run_python(TPU, env)
  print(json.dumps(res))
  assert res["backend"] == "cpu" and res["platform"] == "tpu", res
  assert res["splash_kernel"] and res["splash_manual"], res     # the compiled Mosaic kernel, in a shard_map
  # the XLA path holds [1, 8, 4096, 4096] float32 logits and bf16 probabilities per chip (measured 512 MiB);
  # splash keeps its blocks in VMEM (measured 0.6 MiB forward, 0 forward+backward)
  assert res["xla_temp"] > 256 and res["splash_temp"] < res["xla_temp"] / 10, res
  assert res["splash_grad_temp"] < res["xla_temp"] / 10, res
  assert res["auto"] == dict(self4096=True, cross77=False, self256=False, batch2=False), res
  one = res["one_chip"]
  assert one["splash_fwd"] < one["xla_fwd"] / 10 and one["splash_grad"] < one["xla_grad"] / 10, one
