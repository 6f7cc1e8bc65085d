"""Time to first step, cold and warm: a config trained for a few steps in a fresh workdir (nothing compiled yet:
JAX's persistent cache is the workdir's own, ``config.compilation_cache='auto'``), then the same command resumed
with more steps (the restart after a preemption), which loads the compiled programs from
``<workdir>/compilation_cache``. Prints a table: wall seconds from the process start to the first logged train
step, and the train step's compile seconds as the run logs them.

    python bench/compile_cache.py                        # imagenet64.py:tiny
    python bench/compile_cache.py --config=configs/coco.py:tiny --steps=2
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(r"train step \d+/")   # the first logged step (a resumed run: the one after its checkpoint)
COMPILED = re.compile(r"compiled the train step in ([0-9.]+) s")


def timed_run(config: str, workdir: str, steps: int) -> tuple[float, float]:
  """``(seconds to the first logged step, compile seconds)`` of one training command."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "dmd_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.num_train_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=1000"]
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  first, compiled, tail = None, None, []
  for line in proc.stderr:
    tail = (tail + [line])[-40:]
    if first is None and FIRST_STEP.search(line):
      first = time.time() - t0
    if m := COMPILED.search(line):
      compiled = float(m.group(1))
  if proc.wait() != 0 or first is None:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(tail)}")
  return first, compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/imagenet64.py:tiny")
  parser.add_argument("--steps", type=int, default=2, help="steps of the cold run (the warm one runs twice as many)")
  parser.add_argument("--keep", default="", help="a folder to run in and keep (default: a temporary one)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(args.keep or tmp, "run")
    cold = timed_run(args.config, workdir, args.steps)
    warm = timed_run(args.config, workdir, 2 * args.steps)
  print(f"| {args.config} | time to first step (s) | train step compile (s) |")
  print("| --- | --- | --- |")
  print(f"| cold (fresh workdir) | {cold[0]:.1f} | {cold[1]:.1f} |")
  print(f"| warm (resumed, cached programs) | {warm[0]:.1f} | {warm[1]:.1f} |")
  print(f"| warm / cold | {warm[0] / cold[0]:.2f} | {warm[1] / cold[1]:.2f} |")


if __name__ == "__main__":
  main()
