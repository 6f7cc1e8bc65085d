"""Host memory of a DMD run: the process's resident memory against what the run's arrays need.

    python bench/host_memory.py                                   # full-size ImageNet-64 ADM (bench/edm_step.py's)
    python bench/host_memory.py --config=imagenet64_tiny          # the tiny random ADM (seconds)

``dmd_jax.train.setup`` builds the run of ``configs/imagenet64.py`` (the random-weight ADM teacher of
``bench/edm_step.py``, written once under ``--workdir``; batch 2 per device), then ``run.init_state()`` makes the
initial state. Reported: the bytes of host (numpy) arrays still reachable from the Teacher's functions and from
the Run (apart from its frozen arrays on the mesh) — the host copy of the teacher that the families' closures
used to keep — the bytes of the frozen parameters and of the state, and the process's current resident memory
(``VmRSS``) and peak (``ru_maxrss``) after each stage. ``bench/edm_step.py`` prints the same RSS figures beside
XLA's per-device total of each step it runs. On the CPU backend the "devices" are host memory too: the frozen
arrays and the state count in the RSS.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIB = 2.0 ** 20


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
  import jax
  import numpy as np
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="imagenet64", choices=("imagenet64", "imagenet64_tiny"))
  parser.add_argument("--batch_per_device", type=int, default=2)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dmd_jax_bench_edm_step"),
                      help="where the random teacher is written and kept (bench/edm_step.py's)")
  args = parser.parse_args(argv)

  import jax
  from bench import edm_step
  from dmd_jax import train
  os.makedirs(args.workdir, exist_ok=True)
  ns = argparse.Namespace(config=args.config, batch_per_device=args.batch_per_device, attention="auto", fsdp=1,
                          regression_distance="")
  config = edm_step.make_config(ns, "float32", False, args.workdir)   # writes the random ADM once
  gc.collect()
  print(f"start: {rss_text()}", flush=True)
  t0 = time.perf_counter()
  run = train.setup(config, os.path.join(args.workdir, f"run-{args.config}"))
  gc.collect()
  frozen_bytes = nbytes(jax.tree.leaves(run.frozen))
  teacher_bytes = nbytes(jax.tree.leaves(run.frozen["teacher"]))
  held_teacher = nbytes(host_arrays(run.teacher))
  held_run = nbytes(host_arrays(run))
  print(f"after train.setup ({time.perf_counter() - t0:.0f} s): {rss_text()}; frozen parameters "
        f"{frozen_bytes / MIB:,.0f} MiB (teacher {teacher_bytes / MIB:,.0f} MiB); host arrays reachable from the "
        f"Teacher {held_teacher / MIB:,.1f} MiB, from the Run (besides its arrays on the mesh) "
        f"{held_run / MIB:,.1f} MiB", flush=True)
  t0 = time.perf_counter()
  state = jax.block_until_ready(run.init_state())
  gc.collect()
  state_bytes = nbytes(jax.tree.leaves(state))
  print(f"after run.init_state() ({time.perf_counter() - t0:.0f} s): {rss_text()}; state {state_bytes / MIB:,.0f} "
        f"MiB; frozen + state {(frozen_bytes + state_bytes) / MIB:,.0f} MiB; host arrays reachable from the Teacher "
        f"{nbytes(host_arrays(run.teacher)) / MIB:,.1f} MiB", flush=True)


if __name__ == "__main__":
  main()
