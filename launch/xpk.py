"""dmd_jax.main as an xpk workload on a GKE cluster (TPU slices or GPU nodes).

  python launch/xpk.py --cluster=C --workload=W (--tpu_type=v5litepod-32 | --device_type=h100-80gb-8) \\
      --docker_image=IMAGE [--build [--extras=tpu,gcs]] [--num_slices=1] [--num_nodes=N] [--project=P] [--zone=Z] \\
      [--max_restarts=10] [--priority=medium] [--grace_period=300] [--env=KEY=VALUE ...] [--wait] [--xpk=xpk] \\
      [--dry_run] -- <arguments of dmd_jax.main>

With --build the image is built from launch/Dockerfile (``pip install -e '.[EXTRAS]'`` in /app) and pushed
first. The workload runs ``cd /app && exec python -m dmd_jax.main ARGS`` on every VM of every slice; JAX finds its
place from the variables GKE sets (TPU_WORKER_HOSTNAMES, ...). xpk restarts the whole JobSet, up to
--max_restarts times, when a container exits with 42 (the trainer's preemption exit code: SIGTERM →
checkpoint → exit, dmd_jax/distributed.py) or 127-255; other exit codes fail the workload. --grace_period is the
time a pod has between SIGTERM and SIGKILL: enough to write a checkpoint. ``--dry_run`` prints the commands,
one a line, and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launchlib import ROOT, Runner, note, split_args  # noqa: E402

APP_DIR = "/app"    # WORKDIR of launch/Dockerfile
PRIORITIES = ("very-low", "low", "medium", "high", "very-high")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/xpk.py", description="dmd_jax.main as an xpk workload on GKE.",
      usage="python launch/xpk.py --cluster=C --workload=W (--tpu_type=T | --device_type=D) --docker_image=IMAGE "
            "[--build] [--num_slices=N] [--max_restarts=N] [--dry_run] -- <arguments of dmd_jax.main>")
  p.add_argument("--cluster", required=True, help="The xpk (GKE) cluster.")
  p.add_argument("--workload", required=True, help="Workload name: lowercase letters, digits, '-'.")
  device = p.add_mutually_exclusive_group(required=True)
  device.add_argument("--tpu_type", help="e.g. v5litepod-32, v5p-64")
  device.add_argument("--device_type", help="e.g. h100-80gb-8 (GPU nodes; build with --extras=cuda,gcs)")
  p.add_argument("--num_slices", type=int, default=1, help="TPU slices (multislice over DCN when > 1).")
  p.add_argument("--num_nodes", type=int, default=None, help="--device_type: nodes.")
  p.add_argument("--docker_image", required=True, help="e.g. us-docker.pkg.dev/PROJECT/REPO/dmd-jax:TAG")
  p.add_argument("--build", action="store_true", help="docker build (launch/Dockerfile) and push the image first.")
  p.add_argument("--extras", default="tpu,gcs", help="--build: pip extras, e.g. tpu,gcs,sd for configs/coco.py")
  p.add_argument("--project", default=None)
  p.add_argument("--zone", default=None)
  p.add_argument("--max_restarts", type=int, default=10, help="JobSet restarts (after exit 42, 127-255).")
  p.add_argument("--priority", default=None, choices=PRIORITIES)
  p.add_argument("--grace_period", type=int, default=300,
                 help="Seconds between a pod's SIGTERM and SIGKILL (time to write a checkpoint).")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="Container variable; repeatable.")
  p.add_argument("--wait", action="store_true", help="Wait for the workload to finish (xpk workload list).")
  p.add_argument("--xpk", default="xpk", help="The xpk command.")
  p.add_argument("--dry_run", action="store_true", help="Print every command, one a line; run nothing.")
  return p


def validate(p: argparse.ArgumentParser, o: argparse.Namespace) -> None:
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", o.workload) or len(o.workload) > 40:
    p.error(f"--workload={o.workload!r}: up to 40 lowercase letters, digits and '-', starting with a letter "
            "and not ending with '-'")
  for name in ("num_slices", "max_restarts", "grace_period"):
    if getattr(o, name) < (1 if name == "num_slices" else 0):
      p.error(f"--{name} must be >= {1 if name == 'num_slices' else 0}, got {getattr(o, name)}")
  if o.num_nodes is not None and (o.tpu_type or o.num_nodes < 1):
    p.error(f"--num_nodes={o.num_nodes}: a number >= 1, with --device_type only")
  for kv in o.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv):
      p.error(f"--env={kv!r}: expected KEY=VALUE")
  if not re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", o.extras):
    p.error(f"--extras={o.extras!r}: a comma-separated list of setup.py extras, e.g. tpu,gcs,sd")


def container_command(args: Sequence[str]) -> str:
  """exec: xpk's wrapper passes the pod's SIGTERM to its child, which must be the trainer itself."""
  return f"cd {APP_DIR} && exec python -m dmd_jax.main {shlex.join(args)}"


def build_commands(o) -> list[list[str]]:
  return [["docker", "build", "-f", os.path.join(ROOT, "launch", "Dockerfile"), "--build-arg", f"EXTRAS={o.extras}",
           "-t", o.docker_image, ROOT],
          ["docker", "push", o.docker_image]]


def create_command(o, args: Sequence[str]) -> list[str]:
  device = [f"--tpu-type={o.tpu_type}"] if o.tpu_type else [f"--device-type={o.device_type}"]
  cmd = [o.xpk, "workload", "create", f"--cluster={o.cluster}", f"--workload={o.workload}", *device,
         f"--num-slices={o.num_slices}"]
  if o.num_nodes is not None:
    cmd.append(f"--num-nodes={o.num_nodes}")
  cmd += [f"--docker-image={o.docker_image}", f"--command={container_command(args)}",
          f"--max-restarts={o.max_restarts}", f"--termination-grace-period-seconds={o.grace_period}"]
  if o.priority:
    cmd.append(f"--priority={o.priority}")
  cmd += [f"--env={kv}" for kv in o.env]
  cmd += [f"--project={o.project}"] * bool(o.project) + [f"--zone={o.zone}"] * bool(o.zone)
  return cmd


def wait_command(o) -> list[str]:
  cmd = [o.xpk, "workload", "list", f"--cluster={o.cluster}", f"--wait-for-job-completion={o.workload}"]
  return cmd + [f"--project={o.project}"] * bool(o.project) + [f"--zone={o.zone}"] * bool(o.zone)


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  o, args = split_args(p, sys.argv[1:] if argv is None else argv)
  validate(p, o)
  r = Runner(o.dry_run)
  if o.build:
    for cmd in build_commands(o):
      r.run(cmd)
  r.run(create_command(o, args))
  if o.wait:
    return r.run(wait_command(o), check=False).returncode
  if not o.dry_run:
    note(f"submitted; follow it with: {shlex.join(wait_command(o))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
