"""Helpers shared by the tests: running the entry point in a subprocess (so XLA_FLAGS can emulate devices)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy2d.py")

# A small, fast version of the toy run for tests of the machinery (not of quality).
FAST = ["--config.generator.hidden=(32,32)", "--config.fake_score.hidden=(32,32)",
        "--config.fake_score.num_fourier=8", "--config.batch_size=64", "--config.regression.batch_size=32",
        "--config.regression.num_pairs=512", "--config.regression.shard_size=128",
        "--config.eval.num_samples=1000", "--config.log_every=10"]


def env_with_devices(n: int | None) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if n:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  return env


def main_cmd(*args, config=TOY) -> list[str]:
  return [sys.executable, "-m", "dmd_jax.main", f"--config={config}", *args]


def run_main(*args, devices=None, timeout=600, check=True, config=TOY) -> subprocess.CompletedProcess:
  p = subprocess.run(main_cmd(*args, config=config), cwd=ROOT, env=env_with_devices(devices),
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
  return p
