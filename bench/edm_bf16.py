"""EDM teachers in bfloat16 vs float32: accuracy on the parity fixtures and forward speed.

    python bench/edm_bf16.py                       # fixtures + CIFAR-10 DDPM++ at batch 8
    python bench/edm_bf16.py --nets=imagenet64 --batch=4

Accuracy: relative error (max |diff| / max |ref|) of D and of the worst block activation against the PyTorch
float32 reference in ``tests/fixtures``. Speed: a jitted ``EDMPrecond`` forward (random weights, default XLA
options), median of ``--repeats`` timed calls after one warm-up, on whatever device JAX picks. ``--attention``:
the networks' attention kernel (``dmd_jax.models.attention``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.families.edm.convert import convert_state_dict
from dmd_jax.models.attention import IMPLEMENTATIONS
from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
FIXTURE_NAMES = ["edm_ddpmpp_cond", "edm_ncsnpp_uncond", "edm_adm_cond"]
_CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", augment_dim=9,
              model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
              embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])
NETS = {
    "cifar10": _CIFAR,
    "cifar10-ve": dict(_CIFAR, embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1],
                       channel_mult_noise=2),
    "imagenet64": dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                       model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                       dropout=0.1),
}


def rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / np.abs(want).max())


def fixture_errors(name, attention):
  data = np.load(FIXTURES / f"{name}.npz")
  init_kwargs = json.loads((FIXTURES / f"{name}.json").read_text())
  sd = {k[6:]: data[k].astype(np.float32) for k in data.files if k.startswith("param/")}
  module, params = convert_state_dict(sd, init_kwargs)
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
  x, sigma = jnp.asarray(nhwc(data["in/x_nchw"])), jnp.asarray(data["in/sigma"])
  labels = jnp.asarray(data["in/class_labels"]) if "in/class_labels" in data.files else None
  row = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    m = module.clone(dtype=dtype, attention=attention)
    d, state = jax.jit(lambda p: m.apply({"params": p}, x, sigma, labels, mutable=["intermediates"]))(params)
    acts = state["intermediates"]["model"]
    errs = {k[4:]: rel_err(acts[k[4:]][0], nhwc(data[k])) for k in data.files if k.startswith("act/")}
    worst = max(errs, key=errs.get)
    row[jnp.dtype(dtype).name] = (rel_err(d, nhwc(data["out/D_nchw"])), worst, errs[worst])
  return row


def random_params(module, seed=0):
  """Fan-in scaled random weights of the right shapes (timing only)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_inputs(module)))["params"]

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))

  return jax.tree.map(draw, shapes)


def time_forward(init_kwargs, batch, repeats, attention):
  base = edm_module_from_kwargs(init_kwargs, attention=attention)
  params = random_params(base)
  x, _, labels = init_inputs(base, batch)
  x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  sigma = jnp.full((batch,), 1.0)
  if labels is not None:
    labels = jax.nn.one_hot(jnp.arange(batch) % base.label_dim, base.label_dim)
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    m = base.clone(dtype=dtype)
    f = jax.jit(lambda p, x: m.apply({"params": p}, x, sigma, labels))
    t0 = time.perf_counter()
    jax.block_until_ready(f(params, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, x))
      times.append(time.perf_counter() - t0)
    out[jnp.dtype(dtype).name] = (float(np.median(times)), compile_s)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nets", default="fixtures,cifar10",
                      help=f"comma list of 'fixtures' and {sorted(NETS)}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS, help="the attention kernel")
  args = parser.parse_args()
  nets = args.nets.split(",")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"attention {args.attention}\n")
  if "fixtures" in nets:
    print("| fixture | D rel err f32 | D rel err bf16 | worst block bf16 |")
    print("| --- | --- | --- | --- |")
    for name in FIXTURE_NAMES:
      row = fixture_errors(name, args.attention)
      d32 = row["float32"][0]
      d16, worst, e16 = row["bfloat16"]
      print(f"| {name} | {d32:.1e} | {d16:.1e} | {worst} {e16:.1e} |", flush=True)
    print()
  timed = [n for n in nets if n != "fixtures"]
  if timed:
    print("| net | batch | f32 forward (s) | bf16 forward (s) | bf16 / f32 | compile f32 / bf16 (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in timed:
      t = time_forward(NETS[name], args.batch, args.repeats, args.attention)
      (f32, c32), (b16, c16) = t["float32"], t["bfloat16"]
      print(f"| {name} | {args.batch} | {f32:.3f} | {b16:.3f} | {b16 / f32:.2f} | {c32:.0f} / {c16:.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
