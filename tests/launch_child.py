"""A stand-in for dmd_jax.main in tests of launch/local.py (``--module=launch_child``).

  python -m launch_child --dir=D --mode=env|fail|term|sleep [--fail_id=I] [--code=C]

env    writes D/env_<i>.json (the launcher's variables), prints a line to stdout and one to stderr, exits 0
fail   process --fail_id exits --code at once; the others write D/pid_<i> and sleep
term   writes D/ready_<i>; on SIGTERM writes D/term_<i> and exits 42 (the trainer's preemption exit code)
sleep  writes D/pid_<i> (and D/grandchild_<i>: a `sleep` it started) and sleeps
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

KEYS = ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS",
        "DMD_JAX_NUM_PROCESSES", "DMD_JAX_PROCESS_ID", "NO_GCE_CHECK", "GCE_METADATA_HOST", "GCE_METADATA_ROOT",
        "GCE_METADATA_IP", "TPU_SKIP_MDS_QUERY", "CLOUDSDK_CONFIG", "GOOGLE_APPLICATION_CREDENTIALS",
        "SLURM_PROCID", "SLURM_NTASKS", "KUBERNETES_SERVICE_HOST", "no_proxy", "PYTHONUNBUFFERED")


def _write(path, text=""):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--dir", required=True)
  p.add_argument("--mode", required=True, choices=["env", "fail", "term", "sleep"])
  p.add_argument("--fail_id", type=int, default=1)
  p.add_argument("--code", type=int, default=3)
  a = p.parse_args()
  i = int(os.environ["DMD_JAX_PROCESS_ID"])
  if a.mode == "env":
    _write(os.path.join(a.dir, f"env_{i}.json"), json.dumps({k: os.environ.get(k) for k in KEYS}))
    print(f"hello from {i}")
    print(f"warning from {i}", file=sys.stderr)
    return 0
  if a.mode == "fail" and i == a.fail_id:
    time.sleep(0.3)
    return a.code
  if a.mode == "term":
    def on_term(sig, frame):
      _write(os.path.join(a.dir, f"term_{i}"))
      sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
    _write(os.path.join(a.dir, f"ready_{i}"))
  else:
    if a.mode == "sleep":
      child = subprocess.Popen(["sleep", "60"])
      _write(os.path.join(a.dir, f"grandchild_{i}"), str(child.pid))
    _write(os.path.join(a.dir, f"pid_{i}"), str(os.getpid()))
  time.sleep(60)
  return 0


if __name__ == "__main__":
  sys.exit(main())
