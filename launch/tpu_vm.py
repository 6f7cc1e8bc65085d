"""dmd_jax.main on every worker of a Cloud TPU VM slice, through gcloud.

  python launch/tpu_vm.py --name=NAME --zone=ZONE [--project=P] \\
      [--create --accelerator_type=v5litepod-32 --runtime_version=v2-alpha-tpuv5-lite \\
       [--spot|--reserved|--best_effort]] \\
      [--restart_on_preemption [--max_restarts=N]] [--extras=tpu,gcs] [--python=python3.11] [--reinstall] \\
      [--skip_copy] [--run_id=ID] [--stop] [--dry_run] -- <arguments of dmd_jax.main>

Steps (each a gcloud command; ``--dry_run`` prints them, one a line, and runs nothing):
  1. with --create: a queued resource NAME (node NAME) unless one is ACTIVE; waits until it is ACTIVE
  2. the project (without .venv, .git, runs/, tests/) as a tarball to every worker, unpacked in ~/dmd-jax
  3. a virtualenv ~/dmd-jax/.venv on every worker (once; again with --reinstall or other --extras):
     pip install -e '.[EXTRAS]' with the first Python >= 3.11 found (python3.11 from apt if none)
  4. on every worker: frees the TPU (the libtpu lockfile, processes holding /dev/accel* or /dev/vfio/*), then
     python -m dmd_jax.main ARGS with its output in ~/dmd-jax/logs/RUN_ID/worker<i>.log; worker 0's output is
     streamed here
  5. reads each worker's exit code (~/dmd-jax/logs/RUN_ID/worker<i>.exit): gcloud does not return the
     remote exit codes of a multi-worker ssh

Exit code: a worker's failure code, else 42 when a worker was preempted (SIGTERM → checkpoint → exit 42,
dmd_jax/distributed.py), else 0. With --restart_on_preemption a 42 reruns step 4 (the trainer resumes from the
latest checkpoint in its workdir); with --create, a slice that is no longer ACTIVE (a preempted spot slice) is
deleted, requested again, and steps 2-4 rerun. --stop sends SIGTERM to the trainers (they checkpoint and exit).
Multi-worker ssh needs your key in an ssh-agent: ``ssh-add ~/.ssh/google_compute_engine``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launchlib import PREEMPTED_EXIT_CODE, ROOT, Runner, note, split_args  # noqa: E402

SOURCE_TARBALL = "dmd-jax-src.tgz"    # in the workers' home folder while it is unpacked
TAR_EXCLUDES = ("./.venv", "./.git", "./runs", "./build", "./tests", "./.pytest_cache", "./.whl", "./.gl",
                "__pycache__", "*.egg-info", "*.pyc")
ACTIVE = "ACTIVE"
GONE_STATES = ("SUSPENDING", "SUSPENDED", "FAILED")   # a queued resource in these has lost its TPU
POLL_SECONDS = 30
FREE_TPU = ("sudo rm -f /tmp/libtpu_lockfile; "
            "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9")
STOP_TPU = "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -TERM"
WORKER_ID = ("$(curl -sf -H 'Metadata-Flavor: Google' "
             "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number "
             "2>/dev/null || hostname | sed -n 's/.*-w-\\([0-9]*\\)$/\\1/p')")
EXIT_LINE = re.compile(r"^dmd_jax_exit worker(\d+) (-?\d+)$")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/tpu_vm.py", description="dmd_jax.main on every worker of a Cloud TPU VM slice.",
      usage="python launch/tpu_vm.py --name=NAME --zone=ZONE [--project=P] [--create --accelerator_type=T "
            "--runtime_version=V [--spot|--reserved|--best_effort]] [--restart_on_preemption] [--dry_run] "
            "-- <arguments of dmd_jax.main>")
  p.add_argument("--name", required=True, help="TPU VM (node) name; also the queued resource's with --create.")
  p.add_argument("--zone", required=True, help="e.g. us-west4-a")
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--create", action="store_true", help="Request the slice as a queued resource if needed.")
  p.add_argument("--accelerator_type", default=None, help="--create: e.g. v5litepod-32, v5p-64")
  p.add_argument("--runtime_version", default=None,
                 help="--create: e.g. v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p)")
  tier = p.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="--create: Spot capacity (preemptible)")
  tier.add_argument("--reserved", action="store_true", help="--create: your reservation")
  tier.add_argument("--best_effort", action="store_true", help="--create: best-effort (gcloud alpha)")
  p.add_argument("--restart_on_preemption", action="store_true",
                 help=f"Rerun after exit code {PREEMPTED_EXIT_CODE} (and re-create a lost slice with --create).")
  p.add_argument("--max_restarts", type=int, default=100, help="--restart_on_preemption: at most this many.")
  p.add_argument("--remote_dir", default="dmd-jax", help="The project's folder on the workers (relative: in ~).")
  p.add_argument("--extras", default="tpu,gcs", help="pip extras of the install, e.g. tpu,gcs,sd for configs/coco.py")
  p.add_argument("--python", default=None, help="Python (>= 3.11) that makes the virtualenv (default: found).")
  p.add_argument("--reinstall", action="store_true", help="Make the workers' virtualenv again.")
  p.add_argument("--skip_copy", action="store_true", help="Do not copy the project or touch the virtualenv.")
  p.add_argument("--run_id", default=None, help="Names the log folder logs/RUN_ID (default: the start time).")
  p.add_argument("--stop", action="store_true", help="Send SIGTERM to the trainers on every worker, and exit.")
  p.add_argument("--dry_run", action="store_true", help="Print every command, one a line; run nothing.")
  return p


def validate(p: argparse.ArgumentParser, o: argparse.Namespace) -> None:
  if o.create:
    for name in ("accelerator_type", "runtime_version"):
      if not getattr(o, name):
        p.error(f"--create needs --{name}")
  elif o.accelerator_type or o.runtime_version or o.spot or o.reserved or o.best_effort:
    p.error("--accelerator_type, --runtime_version, --spot, --reserved and --best_effort only go with --create")
  if o.max_restarts < 0:
    p.error(f"--max_restarts must be >= 0, got {o.max_restarts}")
  if not re.fullmatch(r"[a-z][-a-z0-9]*", o.name):
    p.error(f"--name={o.name!r}: TPU names are lowercase letters, digits and '-', starting with a letter")
  if not re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", o.extras):
    p.error(f"--extras={o.extras!r}: a comma-separated list of setup.py extras, e.g. tpu,gcs,sd")
  if o.run_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", o.run_id):
    p.error(f"--run_id={o.run_id!r}: letters, digits, '_', '.', '-' only")


def _scope(o) -> list[str]:
  return [f"--zone={o.zone}"] + ([f"--project={o.project}"] if o.project else [])


def create_command(o) -> list[str]:
  gcloud = ["gcloud", "alpha"] if o.best_effort else ["gcloud"]   # --best-effort is in the alpha track only
  tier = ["--spot"] if o.spot else ["--reserved"] if o.reserved else ["--best-effort"] if o.best_effort else []
  return [*gcloud, "compute", "tpus", "queued-resources", "create", o.name, f"--node-id={o.name}", *_scope(o),
          f"--accelerator-type={o.accelerator_type}", f"--runtime-version={o.runtime_version}", *tier]


def describe_command(o) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", o.name, *_scope(o),
          "--format=value(state.state)"]


def delete_command(o) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", o.name, *_scope(o), "--force", "--quiet"]


def ssh_command(o, remote: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", o.name, *_scope(o), f"--worker={worker}",
          f"--command={remote}"]


def tarball_path(run_id: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"dmd-jax-src-{run_id}.tgz")


def tar_command(path: str) -> list[str]:
  return ["tar", "-czf", path, *[f"--exclude={e}" for e in TAR_EXCLUDES], "-C", ROOT, "."]


def scp_command(o, local: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{o.name}:{SOURCE_TARBALL}", *_scope(o),
          "--worker=all"]


def setup_remote(o) -> str:
  """Unpacks the tarball over the project folder (keeping .venv and logs) and makes the virtualenv once."""
  rd = shlex.quote(o.remote_dir)
  extras = o.extras
  if o.python:
    find_python = f"PY={shlex.quote(o.python)}"
  else:
    find_python = (
        "PY=; for p in python3.13 python3.12 python3.11 python3; do "
        "if command -v $p >/dev/null 2>&1 && $p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' "
        ">/dev/null 2>&1; then PY=$p; break; fi; done; "
        "if [ -z \"$PY\" ]; then echo 'no Python >= 3.11 with venv: installing python3.11 from apt'; "
        "sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 "
        "python3.11-venv && PY=python3.11; fi")
  marker = ".venv/dmd_jax_extras"
  return "; ".join([
      "set -e",
      f"mkdir -p {rd}",
      f"find {rd} -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {{}} +",
      f"tar -xzf {SOURCE_TARBALL} -C {rd}",
      f"rm -f {SOURCE_TARBALL}",
      f"cd {rd}",
      *(["rm -rf .venv"] if o.reinstall else []),
      f"if [ \"$(cat {marker} 2>/dev/null)\" != {extras} ]; then {find_python}; "
      f"rm -rf .venv; $PY -m venv .venv; .venv/bin/pip install -q -U pip; "
      f".venv/bin/pip install -q -e '.[{extras}]'; echo {extras} > {marker}; fi",
  ])


def main_args(args: Sequence[str]) -> list[str]:
  """dmd_jax.main's arguments; ``--config.distributed=yes`` first unless given: over ssh a Cloud TPU VM has no
  cluster variables in its environment, and JAX's own detection (metadata server) then finds the slice."""
  if any(a.startswith("--config.distributed=") or a == "--config.distributed" for a in args):
    return list(args)
  return ["--config.distributed=yes", *args]


def run_remote(o, args: Sequence[str], run_id: str) -> str:
  """Frees the TPU, runs dmd_jax.main with a log and an exit-code file per worker; worker 0 also streams."""
  rd = shlex.quote(o.remote_dir)
  logs = f"logs/{run_id}"
  main = f".venv/bin/python -m dmd_jax.main {shlex.join(main_args(args))}"
  # POSIX sh (no pipefail): the exit code goes through a file, so that tee does not hide it.
  return "; ".join([
      f"cd {rd} || exit 1",
      f"mkdir -p {logs}",
      FREE_TPU,
      f"W={WORKER_ID}",
      f"L={logs}/worker$W",
      "rm -f $L.exit",    # a restart appends to the log; the exit code is this attempt's
      f"if [ \"$W\" = 0 ]; then {{ {main}; echo $? > $L.exit; }} 2>&1 | tee -a $L.log; "
      f"else {{ {main}; echo $? > $L.exit; }} >> $L.log 2>&1; fi",
      "exit $(cat $L.exit)",
  ])


def exit_codes_remote(o, run_id: str) -> str:
  rd = shlex.quote(o.remote_dir)
  return (f"for f in {rd}/logs/{run_id}/worker*.exit; do [ -f \"$f\" ] && "
          f"echo \"dmd_jax_exit $(basename \"$f\" .exit) $(cat \"$f\")\"; done; true")


def parse_exit_codes(text: str) -> dict[int, int]:
  codes = {}
  for line in text.splitlines():
    m = EXIT_LINE.match(line.strip())
    if m:
      codes[int(m.group(1))] = int(m.group(2))
  return codes


def outcome(codes: dict[int, int]) -> int | None:
  """The job's exit code from the workers': a failure (not 0 or 42) first, then 42, else 0; None if none."""
  if not codes:
    return None
  failures = [c for _, c in sorted(codes.items()) if c not in (0, PREEMPTED_EXIT_CODE)]
  if failures:
    return failures[0]
  return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes.values() else 0


class Slice:
  """The steps above on one slice."""

  def __init__(self, o, args: Sequence[str], runner: Runner):
    self.o, self.args, self.r = o, list(args), runner
    self.run_id = o.run_id or time.strftime("%Y%m%d-%H%M%S")

  def state(self) -> str | None:
    p = self.r.run(describe_command(self.o), capture=True, check=False)
    if p.returncode != 0:
      return None
    return (p.stdout or "").strip() or None

  def ensure(self) -> bool:
    """Makes the queued resource ACTIVE (asking for it, or deleting a preempted one and asking again); True
    if it was created."""
    if self.r.dry_run:
      self.state()
      self.r.run(create_command(self.o))
      return True
    created = False
    while True:
      state = self.state()
      if state == ACTIVE:
        return created
      if state is None:
        self.r.run(create_command(self.o))
        created = True
      elif state in GONE_STATES:
        if created and state == "FAILED":
          raise SystemExit(f"queued resource {self.o.name} is FAILED (gcloud compute tpus queued-resources "
                           f"describe {self.o.name} --zone={self.o.zone} says why)")
        note(f"queued resource {self.o.name} is {state}: deleting it and asking again")
        self.r.run(delete_command(self.o))
      else:
        note(f"queued resource {self.o.name}: {state}; waiting")
      time.sleep(POLL_SECONDS)

  def copy_and_setup(self) -> None:
    path = tarball_path(self.run_id)
    self.r.run(tar_command(path))
    try:
      self.r.run(scp_command(self.o, path))
    finally:
      if not self.r.dry_run and os.path.exists(path):
        os.remove(path)
    self.r.run(ssh_command(self.o, setup_remote(self.o)))

  def run_once(self) -> int:
    p = self.r.run(ssh_command(self.o, run_remote(self.o, self.args, self.run_id)), check=False)
    q = self.r.run(ssh_command(self.o, exit_codes_remote(self.o, self.run_id)), capture=True, check=False)
    if self.r.dry_run:
      return 0
    rc = outcome(parse_exit_codes(q.stdout or ""))
    if rc is None:
      note(f"no worker reported an exit code (ssh exit code {p.returncode})")
      return p.returncode or 255
    return rc

  def main(self) -> int:
    o = self.o
    if o.stop:
      self.r.run(ssh_command(o, STOP_TPU))
      return 0
    if o.create:
      self.ensure()
    if not o.skip_copy:
      self.copy_and_setup()
    restarts = 0
    while True:
      rc = self.run_once()
      if self.r.dry_run or not o.restart_on_preemption or rc == 0:
        return rc
      lost = False
      if o.create:
        state = self.state()
        lost = state != ACTIVE
        if lost:
          note(f"slice {o.name} is {state or 'gone'} after exit code {rc}")
      if rc != PREEMPTED_EXIT_CODE and not lost:
        return rc
      if restarts >= o.max_restarts:
        note(f"preempted, and --max_restarts={o.max_restarts} restarts done")
        return rc
      restarts += 1
      note(f"preempted (exit code {rc}): restart {restarts} of at most {o.max_restarts}")
      if lost and self.ensure() and not o.skip_copy:
        self.copy_and_setup()


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  o, args = split_args(p, argv, required="--stop" not in argv[:argv.index("--") if "--" in argv else None])
  validate(p, o)
  return Slice(o, args, Runner(o.dry_run)).main()


if __name__ == "__main__":
  sys.exit(main())
