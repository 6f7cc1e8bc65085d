"""Pieces shared by the DMD step benchmarks (``bench/edm_step.py``, ``bench/sd_memory.py``): compile and time a
jitted step (``train.Run.jit_train_step`` / ``jit_generator_step`` / ``jit_fake_step``), and XLA's per-device
memory and flop counts of a compiled program."""
from __future__ import annotations

import sys
import time

import jax
import numpy as np

from dmd_jax import plan
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
