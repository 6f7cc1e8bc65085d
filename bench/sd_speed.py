"""Stable Diffusion speed: one-step generation vs the guided 50-step teacher, and our UNet train step vs the
diffusers PyTorch UNet's on the same configuration and machine.

    python bench/sd_speed.py --size=full                      # SD 1.5 shapes (an accelerator job)
    python bench/sd_speed.py --size=mid --batch 1 --train_batch 2     # a CPU-sized UNet / VAE
    python bench/sd_speed.py --size=tiny --repeats=1          # the :tiny shapes (a smoke test)

Two tables (Markdown, rows as they finish; ``--out FILE`` also writes them there):

1. **Latency at equal batch**: the one-step generator (UNet at t = 999 on unit-noise latents, eps -> x0 in
   float32, VAE decode to images) against the teacher (PNDM, ``--teacher_steps`` = 50 steps = 51 UNet
   evaluations, classifier-free guidance 3 on doubled rows, the same VAE decode). Both are single jitted
   programs built from the same functions the method uses (``dmd_jax.samplers.pndm_sample``,
   ``VPSchedule.eps_to_x0``); text embeddings are inputs (the CLIP text encoder runs once per prompt for either
   and is left out). Wall time: median of ``--repeats`` calls after one warm-up call that also compiles.
2. **UNet train step**: epsilon-prediction MSE at random DDPM timesteps on random latents and text
   embeddings, backward, gradient clipping at 10 and AdamW (lr 1e-5, wd 0.01) — the step a fine-tune or DMD's
   fake score runs. Ours: ``UNet2DConditionModel`` (``dmd_jax.models.unet2d``) with float32 parameters and
   bfloat16 activations (float32 norms and softmax), jitted with the state donated, one row per
   ``--attention`` kernel (the UNet's ``attention`` argument). Reference: diffusers'
   ``UNet2DConditionModel`` built from the same config.json dict, float32 parameters under
   ``torch.autocast(bfloat16)`` (the usual mixed-precision recipe; plain float32 with ``--dtype=float32``), PyTorch's scaled-dot-product attention,
   ``torch.optim.AdamW`` (foreach) and ``clip_grad_norm_``. ``--remat`` on = our per-block rematerialisation
   and diffusers' ``enable_gradient_checkpointing()``. Skipped with a note when torch / diffusers are missing.

Weights are random (speed does not depend on them). On a CPU pin the process to cores with ``taskset`` and set
``--torch_threads`` to the same count so both frameworks get the same cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dmd_jax.families.sd import convert as sd_convert  # noqa: E402
from dmd_jax.models.attention import IMPLEMENTATIONS  # noqa: E402
from dmd_jax.samplers import pndm_sample  # noqa: E402
from dmd_jax.schedules import VPSchedule  # noqa: E402

# A CPU-sized SD 1.x: the full layout (3 cross-attention levels, 2 layers per block, 8 heads, 77-token text of
# width 768) at a quarter of the channels, 32x32 latents (256 px images).
MID_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=[64, 128, 256, 256], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32)
MID_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[32, 64, 128, 128], layers_per_block=2, latent_channels=4,
    norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    sample_size=256, scaling_factor=0.18215)


def sizes(name: str) -> tuple[dict, dict, int]:
  """(UNet config, VAE config, text length) of ``--size``."""
  if name == "full":
    return dict(sd_convert.SD15_UNET), dict(sd_convert.SD15_VAE), 77
  if name == "mid":
    return dict(MID_UNET), dict(MID_VAE), 77
  if name == "tiny":
    return dict(sd_convert.TINY_UNET), dict(sd_convert.TINY_VAE), 16
  raise ValueError(f"--size must be 'full', 'mid' or 'tiny', got {name!r}")


def timed(fn, args, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of ``repeats`` later calls) in seconds; ``fn`` returns arrays."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def init_params(module, inputs, seed: int):
  return jax.jit(module.init)(jax.random.PRNGKey(seed), *inputs)["params"]


def count(params) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------------------
# 1. latency: one step vs the guided teacher
# --------------------------------------------------------------------------------------------------------

def latency_rows(args, unet_cfg, vae_cfg, text_len, emit):
  dtype = jnp.dtype(args.dtype)
  unet, unet_in = sd_convert.build_unet(unet_cfg, dtype=dtype)
  vae, vae_in = sd_convert.build_vae(vae_cfg, dtype=dtype)
  p_unet, p_vae = init_params(unet, unet_in, 0), init_params(vae, vae_in, 1)
  schedule = VPSchedule()
  scaling = float(vae_cfg.get("scaling_factor", 0.18215))
  res, ch, width = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg["cross_attention_dim"]

  def eps_fn(p):
    return lambda x, t, c: unet.apply({"params": p}, x, t, c)

  def decode(p, x0):
    return vae.apply({"params": p}, x0 / scaling, method="decode")

  @jax.jit
  def one_step(pu, pv, z, cond):
    t = jnp.full((z.shape[0],), 999, jnp.int32)
    return decode(pv, schedule.eps_to_x0(z, eps_fn(pu)(z, t, cond), t))

  @jax.jit
  def teacher(pu, pv, z, cond, uncond):
    x0 = pndm_sample(eps_fn(pu), z, cond, uncond, num_steps=args.teacher_steps, guidance_scale=args.guidance,
                     alphas_cumprod=schedule.alphas_cumprod)
    return decode(pv, x0)

  for b in args.batch:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(b), 3)
    z = jax.random.normal(k1, (b, res, res, ch), jnp.float32)
    cond = jax.random.normal(k2, (b, text_len, width), jnp.float32)
    uncond = jax.random.normal(k3, (1, text_len, width), jnp.float32)
    c1, s1 = timed(one_step, (p_unet, p_vae, z, cond), args.repeats)
    ct, st = timed(teacher, (p_unet, p_vae, z, cond, uncond), max(1, args.repeats // 2))
    calls = args.teacher_steps + 1
    rows = calls * (2 if args.guidance != 1.0 else 1)
    emit(f"| {b} | 1 | {s1 * 1e3:,.1f} | {b / s1:,.2f} | {calls} ({rows}) | {st * 1e3:,.1f} | {b / st:,.3f} | "
         f"{st / s1:,.1f}× | {c1:.1f} / {ct:.1f} |")


# --------------------------------------------------------------------------------------------------------
# 2. UNet train step: ours vs diffusers'
# --------------------------------------------------------------------------------------------------------

def _optimizer():
  return optax.chain(optax.clip_by_global_norm(10.0),
                     optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))


def jax_train_row(args, unet_cfg, text_len, b: int, remat: bool, attention: str) -> dict:
  unet, unet_in = sd_convert.build_unet(unet_cfg, dtype=jnp.dtype(args.dtype), remat=remat, attention=attention)
  params = init_params(unet, unet_in, 0)
  opt = _optimizer()
  opt_state = jax.jit(opt.init)(params)
  schedule = VPSchedule()
  res, ch, width = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg["cross_attention_dim"]

  def loss_fn(p, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x0 = jax.random.normal(k1, (b, res, res, ch), jnp.float32)
    noise = jax.random.normal(k2, x0.shape, jnp.float32)
    t = jax.random.randint(k3, (b,), 0, schedule.num_timesteps)
    cond = jax.random.normal(k4, (b, text_len, width), jnp.float32)
    eps = unet.apply({"params": p}, schedule.add_noise(x0, noise, t), t, cond)
    return jnp.mean((eps.astype(jnp.float32) - noise) ** 2)

  def step(p, s, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  params, opt_state, loss = jax.block_until_ready(step(params, opt_state, key))
  first = time.perf_counter() - t0
  times = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(step(params, opt_state, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t0)
  return {"first": first, "median": float(np.median(times)), "loss": float(loss), "params": count(params)}


def torch_train_row(args, unet_cfg, text_len, b: int, remat: bool) -> dict | None:
  try:
    import torch
    from diffusers import UNet2DConditionModel
  except ImportError as e:
    print(f"torch / diffusers not importable ({e}): no reference rows", file=sys.stderr)
    return None
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
  model = UNet2DConditionModel(**cfg).to(dev).train()
  if remat:
    model.enable_gradient_checkpointing()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  abar = torch.tensor(VPSchedule().alphas_cumprod, dtype=torch.float32, device=dev)
  res, ch, width = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg["cross_attention_dim"]

  def step():
    x0 = torch.randn(b, ch, res, res, device=dev)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (b,), device=dev)
    cond = torch.randn(b, text_len, width, device=dev)
    a = abar[t].view(-1, 1, 1, 1)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      eps = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
    loss = torch.mean((eps.float() - noise) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    return loss.detach()

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  t0 = time.perf_counter()
  loss = step()
  sync()
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  n = sum(p.numel() for p in model.parameters())
  model = opt = None   # freed before empty_cache hands the memory back
  if dev.type == "cuda":
    torch.cuda.empty_cache()
  return {"first": first, "median": float(np.median(times)), "loss": float(loss), "params": n,
          "device": str(dev), "torch": torch.__version__}


def train_rows(args, unet_cfg, text_len, emit):
  for remat in args.remat:
    for b in args.train_batch:
      # the reference first: it hands its GPU memory back (empty_cache) before JAX grows its pool
      ref = None if args.no_torch else torch_train_row(args, unet_cfg, text_len, b, remat == "on")
      ref_cols = "n/a | n/a | n/a | n/a"
      for attention in args.attention:
        try:
          ours = jax_train_row(args, unet_cfg, text_len, b, remat == "on", attention)
        except Exception as e:  # noqa: BLE001  (e.g. a kernel this GPU / cuDNN lacks: the row says so)
          emit(f"| {remat} | {attention} | {b} | failed: {type(e).__name__}: {str(e)[:150]} | | | | | | |")
          continue
        if ref is not None:
          if ref["params"] != ours["params"]:
            raise RuntimeError(f"parameter counts differ: ours {ours['params']:,} vs diffusers {ref['params']:,}")
          ref_cols = (f"{ref['median'] * 1e3:,.1f} | {b / ref['median']:,.2f} | "
                      f"{ref['median'] / ours['median']:.2f}× | {ref['first']:.1f}")
        emit(f"| {remat} | {attention} | {b} | {ours['median'] * 1e3:,.1f} | {b / ours['median']:,.2f} | "
             f"{ours['first']:.1f} | {ref_cols} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="full", choices=("full", "mid", "tiny"))
  p.add_argument("--parts", default="latency,train", help="comma-separated: latency, train")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="latency table batch sizes")
  p.add_argument("--train_batch", type=int, nargs="+", default=[8], help="train-step batch sizes")
  p.add_argument("--remat", nargs="+", default=["off"], choices=("off", "on"))
  p.add_argument("--attention", nargs="+", default=["auto"], choices=IMPLEMENTATIONS,
                 help="our attention kernel(s) in the train rows (the UNet's attention argument, "
                      "dmd_jax.models.attention)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="activations: ours, and torch.autocast on or off for the reference")
  p.add_argument("--teacher_steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=3.0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
  p.add_argument("--no_torch", action="store_true", help="skip the diffusers reference rows")
  p.add_argument("--out", default="", help="also write the tables to this file")
  args = p.parse_args(argv)
  parts = {s for s in args.parts.split(",") if s}
  unknown = parts - {"latency", "train"}
  if unknown:
    p.error(f"unknown --parts {sorted(unknown)}; expected latency and/or train")
  unet_cfg, vae_cfg, text_len = sizes(args.size)
  lines = []

  def emit(line=""):
    print(line, flush=True)
    lines.append(line)
    if args.out:
      with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")

  dev = jax.devices()[0]
  emit(f"device: {dev.platform} ({dev.device_kind}) × {jax.device_count()}, jax {jax.__version__}; size {args.size} "
       f"(UNet block_out_channels {unet_cfg['block_out_channels']}, {unet_cfg['sample_size']}² latents, "
       f"text {text_len}×{unet_cfg['cross_attention_dim']}); activations {args.dtype}; median of {args.repeats}")
  if "latency" in parts:
    emit()
    emit(f"| batch | one-step UNet calls | one-step (ms) | one-step images/s | teacher UNet calls (rows / image; "
         f"PNDM {args.teacher_steps}, g={args.guidance:g}) | teacher (ms) | teacher images/s | teacher / one-step | first calls (s) |")
    emit("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    latency_rows(args, unet_cfg, vae_cfg, text_len, emit)
  if "train" in parts:
    emit()
    emit("| remat | our attention | batch | ours (ms) | ours samples/s | ours first call (s) | diffusers (ms) | diffusers samples/s "
         "| diffusers / ours | diffusers first call (s) |")
    emit("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    train_rows(args, unet_cfg, text_len, emit)


if __name__ == "__main__":
  main()
