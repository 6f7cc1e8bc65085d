"""Pieces shared by the DMD step benchmarks (``bench/edm_step.py``, ``bench/sd_memory.py``): the generator and
fake-score steps jitted as ``train.py`` jits its step (in / out shardings, the updated state donated), compile
and time, and XLA's per-device memory and flop counts of a compiled program."""
from __future__ import annotations

import sys
import time

import jax
import numpy as np

from dmd_jax import dmd, plan
from dmd_jax.plan import flops   # XLA's flop count per device, one definition (dmd_jax/plan.py)

MIB = 2.0 ** 20
GIB = 2.0 ** 30


def memory(compiled) -> dict:
  """XLA's ``memory_analysis()`` of a compiled program, per device, in bytes (``dmd_jax.plan.memory``: temp,
  argument, output, alias, generated code and their total); ``{}`` on a backend without it."""
  try:
    return plan.memory(compiled)
  except Exception as e:  # noqa: BLE001  (a backend without it)
    print(f"memory_analysis unavailable: {e}", file=sys.stderr)
    return {}


def total_bytes(m: dict) -> int | None:
  """What the program holds on a device at its peak: argument + output - alias + temp (None when unknown)."""
  if not {"argument", "output", "alias", "temp"} <= set(m):
    return None
  return m["argument"] + m["output"] - m["alias"] + m["temp"]


def measure(jitted, args, feed, *, warmup: int, repeats: int, run: bool = True) -> tuple[dict, tuple]:
  """Compiles ``jitted`` for ``args`` and times ``warmup + repeats`` calls; ``feed(args, out)`` returns the next
  call's arguments (the donated state replaced by the returned one). ``run=False``: compile only (``args`` may
  then be ``jax.ShapeDtypeStruct``\\ s)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  row = {"compile_s": compile_s, "memory": memory(compiled), "flops": flops(compiled)}
  print(f"    compiled in {compile_s:.1f} s; memory {row['memory']}; flops {row['flops']}", file=sys.stderr,
        flush=True)
  times = []
  for i in range(warmup + repeats if run else 0):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    dt = time.perf_counter() - t0
    if i >= warmup:
      times.append(dt)
    args = feed(args, out)
    del out
  row["times"] = times
  row["median_s"] = float(np.median(times)) if times else float("nan")
  return row, args


def jit_generator_step(nets, hyper, gen_sh, frozen_sh, fake_params_sh, batch_sh, batch_tree_sh, repl):
  """``dmd.generator_update`` as ``(gen_state, frozen, fake_params, z, cond, batch, rng) -> (gen_state, x,
  metrics)``, the generator state donated. ``batch_sh`` shards ``z`` / ``cond``, ``batch_tree_sh`` the regression
  batch dict."""
  def gen_step(gen_state, frozen, fake_params, z, cond, batch, rng):
    return dmd.generator_update(gen_state, nets, hyper, frozen, fake_params, z, cond, batch, rng)

  return jax.jit(gen_step, in_shardings=(gen_sh, frozen_sh, fake_params_sh, batch_sh, batch_sh, batch_tree_sh,
                                         repl),
                 out_shardings=(gen_sh, batch_sh, repl), donate_argnums=(0,))


def jit_fake_step(nets, hyper, fake_sh, frozen_sh, batch_sh, repl):
  """``dmd.fake_score_update`` as ``(fake_state, frozen, x, cond, rng) -> (fake_state, metrics)``, the state
  donated (``frozen``: the teacher's arrays a LoRA fake score adapts)."""
  def fake_step(fake_state, frozen, x, cond, rng):
    return dmd.fake_score_update(fake_state, nets, hyper, frozen, x, cond, {}, rng)   # no GAN: no real batch

  return jax.jit(fake_step, in_shardings=(fake_sh, frozen_sh, batch_sh, batch_sh, repl),
                 out_shardings=(fake_sh, repl), donate_argnums=(0,))
