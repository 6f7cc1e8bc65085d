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
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from bench import edm_step  # noqa: E402
from bench.common import MIB, host_arrays, nbytes, rss_text  # noqa: E402
from dmd_jax import train  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="imagenet64", choices=("imagenet64", "imagenet64_tiny"))
  parser.add_argument("--batch_per_device", type=int, default=2)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dmd_jax_bench_edm_step"),
                      help="where the random teacher is written and kept (bench/edm_step.py's)")
  args = parser.parse_args(argv)

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
