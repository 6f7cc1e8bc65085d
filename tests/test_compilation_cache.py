"""The persistent compilation cache a run keeps in its workdir (``config.compilation_cache``, ``train.start_process``):
a resumed run loads the train step it compiled instead of compiling it again, and the cache can be turned off.
The subprocesses run without the suite's own cache (``JAX_COMPILATION_CACHE_DIR``)."""
import glob
import os
import re
import subprocess

import pytest

from helpers import CACHE_ENV, FAST, ROOT, env_with_devices, main_cmd

pytestmark = pytest.mark.slow   # three toy runs in subprocesses, without the suite's compilation cache
STEPS = ["--config.checkpoint_every=10", "--config.log_every=10", "--config.evals.toy.type="]


def _run(*args):
  env = {k: v for k, v in env_with_devices(None).items() if k not in CACHE_ENV}
  p = subprocess.run(main_cmd(*FAST, *STEPS, *args), cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stderr


def _compile_seconds(log: str) -> float:
  return float(re.search(r"compiled the train step in ([0-9.]+) s", log).group(1))


def test_a_resumed_run_loads_its_compiled_step(tmp_path):
  workdir = tmp_path / "run"
  cold = _run(f"--workdir={workdir}", "--config.num_train_steps=10")
  cache = workdir / "compilation_cache"
  assert f"persistent compilation cache: {cache}" in cold
  entries = glob.glob(str(cache / "jit_train_step-*"))
  assert len(entries) == 1
  written = os.path.getmtime(entries[0])
  warm = _run(f"--workdir={workdir}", "--config.num_train_steps=20")
  assert "resumed from" in warm and glob.glob(str(cache / "jit_train_step-*")) == entries
  assert os.path.getmtime(entries[0]) == written           # read, not compiled and written again
  print(f"train step compile: cold {_compile_seconds(cold):.2f} s, warm {_compile_seconds(warm):.2f} s")
  assert _compile_seconds(warm) < _compile_seconds(cold)


def test_cache_off(tmp_path):
  off = _run(f"--workdir={tmp_path / 'off'}", "--config.num_train_steps=10", "--config.compilation_cache=")
  assert "persistent compilation cache" not in off and not (tmp_path / "off" / "compilation_cache").exists()
