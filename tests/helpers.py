"""Helpers shared by the tests: running the entry point in a subprocess (so XLA_FLAGS can emulate devices)."""
import glob
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy2d.py")

# A small, fast version of the toy run for tests of the machinery (not of quality).
FAST = ["--config.generator.hidden=(32,32)", "--config.fake_score.hidden=(32,32)",
        "--config.fake_score.num_fourier=8", "--config.batch_size=64", "--config.regression.batch_size=32",
        "--config.regression.num_pairs=512", "--config.regression.shard_size=128",
        "--config.evals.toy.num_samples=1000", "--config.log_every=10"]


def no_evals(*names: str) -> list[str]:
  """Flags that turn the named evaluators of a config off (``config.evals.<name>.type = ''``)."""
  return [f"--config.evals.{name}.type=" for name in names]


NO_EVALS_TOY, NO_EVALS_EDM, NO_EVALS_SD = no_evals("toy"), no_evals("grid", "fid"), no_evals("grid", "coco")


# For the :tiny image configs: compile fast (the programs are tiny; LLVM's optimisation is what takes time).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Every test process (pytest's own and the subprocesses, which inherit its environment: conftest.py) reuses
# compiled programs through JAX's persistent compilation cache: the same train step compiled by a run and
# its resume, by the tests of one config, ... is compiled once per test session. Programs compiled in under
# CACHE_MIN_COMPILE_S are not stored. The cache key covers the program, the XLA flags and the devices.
CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dmd_jax_test_cache_{os.getuid()}")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}


def env_with_devices(n: int | None, fast_compile: bool = False) -> dict:
  """The environment of a subprocess: ``n`` emulated CPU devices; ``fast_compile``: LLVM's optimisation off
  (compiles ~25% faster, runs up to 10× slower: for programs that run a step or two). The persistent
  compilation cache comes with the environment (conftest.py)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(CACHE_ENV)
  flags = []
  if n:
    flags.append(f"--xla_force_host_platform_device_count={n}")
  if fast_compile:
    flags.append(FAST_COMPILE)
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def main_cmd(*args, config=TOY, script=None) -> list[str]:
  """The entry point's command line; ``script`` (Python source ending in ``app.run(main.main)``) runs instead of
  ``-m dmd_jax.main`` when a test must patch something inside the process first."""
  entry = ["-c", script] if script else ["-m", "dmd_jax.main"]
  return [sys.executable, *entry, f"--config={config}", *args]


def run_main(*args, devices=None, timeout=600, check=True, config=TOY, fast_compile=False,
             script=None) -> subprocess.CompletedProcess:
  p = subprocess.run(main_cmd(*args, config=config, script=script), cwd=ROOT,
                     env=env_with_devices(devices, fast_compile),
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
  return p


def read_shards(folder) -> dict[str, dict[str, np.ndarray]]:
  """The complete shards of a pair or real-latent store (``data/pairs.py``: ``shard-NNNNN.<array>.npy``, the
  ``index`` file written last), as ``{'shard-NNNNN': {array: values}}``."""
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "shard-*.index.npy"))):
    shard = os.path.basename(path).split(".")[0]
    out[shard] = {os.path.basename(f).split(".")[1]: np.load(f)
                  for f in sorted(glob.glob(os.path.join(folder, f"{shard}.*.npy")))}
  return out


def read_pairs(workdir) -> dict[str, np.ndarray]:
  """Every array of ``<workdir>/pairs``, the shards concatenated."""
  parts = list(read_shards(os.path.join(workdir, "pairs")).values())
  assert parts, f"no pairs in {workdir}"
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
