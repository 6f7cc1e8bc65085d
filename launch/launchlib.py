"""Shared by the cloud launchers: the ``--`` split of the command line and printing or running commands."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trainer's exit code after a SIGTERM and a saved checkpoint (dmd_jax/distributed.py: PREEMPTED_EXIT_CODE).
PREEMPTED_EXIT_CODE = 42


def split_args(parser: argparse.ArgumentParser, argv: Sequence[str], required: bool = True
               ) -> tuple[argparse.Namespace, list[str]]:
  """Parses the flags before the first ``--``; returns them and the arguments of dmd_jax.main after it."""
  argv = list(argv)
  if "--" not in argv and (not required or {"-h", "--help"} & set(argv)):
    return parser.parse_args(argv), []
  if "--" not in argv:
    parser.error("put the arguments of dmd_jax.main after '--', e.g. -- --config=configs/coco.py --workdir=gs://...")
  i = argv.index("--")
  opts = parser.parse_args(argv[:i])
  rest = argv[i + 1:]
  if not rest:
    parser.error("no arguments of dmd_jax.main after '--'")
  return opts, rest


def note(msg: str) -> None:
  print(f"[launch] {msg}", file=sys.stderr, flush=True)


class Runner:
  """Runs commands, or with ``dry_run`` prints each (one line, shell-quoted: exactly what would run)."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, cmd: Sequence[str], *, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    line = shlex.join(cmd)
    if self.dry_run:
      print(line, flush=True)
      return subprocess.CompletedProcess(list(cmd), 0, "", "")
    note(f"$ {line}")
    try:
      p = subprocess.run(list(cmd), stdout=subprocess.PIPE if capture else None, text=True)
    except FileNotFoundError:
      raise SystemExit(f"{cmd[0]!r} is not on PATH (needed for: {line})") from None
    if check and p.returncode != 0:
      raise SystemExit(f"exit code {p.returncode} from: {line}")
    return p
