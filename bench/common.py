"""Pieces shared by the DMD step benchmarks (``bench/edm_step.py``, ``bench/sd_memory.py``,
``bench/host_memory.py``): compile and time a jitted step (``train.Run.jit_train_step`` / ``jit_generator_step`` /
``jit_fake_step``), XLA's per-device memory and flop counts of a compiled program, and the process's host memory
(resident set, and the arrays reachable from an object)."""
from __future__ import annotations

import gc
import resource
import sys
import time
import types

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


def rss() -> dict:
  """The process's resident memory now (``VmRSS`` of /proc/self/status) and its peak (``ru_maxrss``), bytes."""
  current = 0
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          current = int(line.split()[1]) * 1024
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
  return {"rss": current, "peak_rss": peak}


def rss_text(r: dict | None = None) -> str:
  r = r or rss()
  return f"RSS {r['rss'] / MIB:,.0f} MiB, peak {r['peak_rss'] / MIB:,.0f} MiB"


def host_arrays(root, device_arrays: bool = False) -> list:
  """The numpy arrays (with ``device_arrays`` also the jax arrays) reachable from ``root`` through containers,
  object attributes, bound methods and functions' closures and defaults (not through modules, classes or
  functions' globals). ``tests/test_host_memory.py`` uses it too."""
  kinds = (np.ndarray, jax.Array) if device_arrays else np.ndarray
  seen, stack, found = set(), [root], []
  while stack:
    o = stack.pop()
    if id(o) in seen:
      continue
    seen.add(id(o))
    if isinstance(o, kinds):
      found.append(o)
    elif isinstance(o, (types.ModuleType, type, jax.Array)):
      continue
    elif isinstance(o, types.FunctionType):
      stack += [c.cell_contents for c in o.__closure__ or () if c.cell_contents is not None]
      stack += list(o.__defaults__ or ()) + list((o.__kwdefaults__ or {}).values())
    else:
      stack += gc.get_referents(o)
  return found


def nbytes(arrays) -> int:
  return sum(int(a.nbytes) for a in arrays)
