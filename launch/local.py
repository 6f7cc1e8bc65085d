"""N processes of ``dmd_jax.main`` on this machine, as one multi-process JAX job on CPU devices.

  python launch/local.py --num_processes=2 --devices_per_process=4 [--port=P] [--log_dir=DIR] \\
      [--timeout=SECONDS] [--grace=SECONDS] -- --config=configs/toy2d.py --workdir=runs/mp

Each child runs ``sys.executable -m dmd_jax.main <arguments after -->`` with ``JAX_PLATFORMS=cpu``,
``--xla_force_host_platform_device_count=K`` added to ``XLA_FLAGS`` and its place in the job in the
environment (``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``, ``DMD_JAX_NUM_PROCESSES``, ``DMD_JAX_PROCESS_ID``;
see ``dmd_jax/distributed.py``). Cloud clients are pointed at 127.0.0.1 so that nothing probes a metadata
server or reads the user's credentials (``CHILD_ENV`` below; ``--allow_cloud`` keeps the environment as it is).

Output lines are prefixed ``[p<i>] `` (stdout to stdout, stderr to stderr) and, with ``--log_dir``, written to
``<log_dir>/process_<i>.log``. The exit code is the first non-zero exit code of a child (a child killed by
signal N counts as 128+N), after which the other children are stopped (SIGTERM, then SIGKILL after
``--grace`` seconds); 0 when every child succeeds; 124 when ``--timeout`` expires. SIGTERM / SIGINT received
by this script are forwarded to every child (a second SIGINT kills them); each child runs in its own process
group, and no child outlives this script.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TIMEOUT_EXIT_CODE = 124

# An address where nothing listens: requests sent there are refused at once and never leave the machine.
NOWHERE = "127.0.0.1:9"

# Keeps cloud clients off the network: every metadata-server address the clients read points at NOWHERE, and
# no credentials file is found.
#   NO_GCE_CHECK=true   google-auth skips its GCE detection (compute_engine/_metadata.py: exactly 'true');
#                       gcsfs drops its 'cloud' (metadata) token method (credentials.py).
#   GCE_METADATA_HOST   google-auth's metadata host:port (its older name GCE_METADATA_ROOT is also TensorStore's,
#   GCE_METADATA_ROOT   oauth2/gce_auth_provider.cc, which Orbax uses for gs://).
#   GCE_METADATA_IP     google-auth's ping address; JAX's Cloud TPU cluster detection reads metadata from it
#                       (jax/_src/clusters/cloud_tpu_cluster.py).
#   TPU_SKIP_MDS_QUERY  JAX's GCE TPU detection returns early without a metadata request.
#   CLOUDSDK_CONFIG     the gcloud config folder where google-auth and TensorStore look for
#                       application_default_credentials.json: /dev/null holds none, so no token refresh is tried.
CHILD_ENV = {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": NOWHERE,
    "GCE_METADATA_ROOT": NOWHERE,
    "GCE_METADATA_IP": NOWHERE,
    "TPU_SKIP_MDS_QUERY": "1",
    "CLOUDSDK_CONFIG": os.devnull,
}
# Removed with --allow_cloud unset: explicit credentials and test tokens.
CLOUD_CREDENTIALS = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING")

# Always removed: variables by which JAX would detect another cluster (SLURM, Open MPI, Kubernetes, a TPU pod)
# and override this job's layout, e.g. restrict each process to the GPU named by SLURM_LOCALID.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MEGASCALE_")
_CLUSTER_NAMES = ("KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                  "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT", "JOB_COMPLETION_INDEX")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(existing: str, devices: int) -> str:
  """``existing`` with any device-count flag replaced by ``--xla_force_host_platform_device_count=devices``."""
  kept = [f for f in existing.split() if f != DEVICE_COUNT_FLAG and not f.startswith(DEVICE_COUNT_FLAG + "=")]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def child_env(base: Mapping[str, str], process_id: int, num_processes: int, devices: int, port: int,
              allow_cloud: bool = False) -> dict[str, str]:
  """The environment of child ``process_id``."""
  env = {k: v for k, v in base.items()
         if not k.startswith(_CLUSTER_PREFIXES) and k not in _CLUSTER_NAMES}
  if not allow_cloud:
    for k in CLOUD_CREDENTIALS:
      env.pop(k, None)
    env.update(CHILD_ENV)
  coordinator = f"127.0.0.1:{port}"
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": xla_flags(base.get("XLA_FLAGS", ""), devices),
      "JAX_COORDINATOR_ADDRESS": coordinator,
      "JAX_COORDINATOR_BIND_ADDRESS": coordinator,   # the coordinator listens on loopback only
      "DMD_JAX_NUM_PROCESSES": str(num_processes),
      "DMD_JAX_PROCESS_ID": str(process_id),
      "PYTHONUNBUFFERED": "1",
  })
  # A user's proxy must not carry the coordinator's gRPC traffic (set only with a proxy: JAX warns about any
  # *_proxy variable).
  if any(k.lower() in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy") for k in env):
    for key in ("no_proxy", "NO_PROXY"):
      hosts = [h for h in env.get(key, "").split(",") if h]
      env[key] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _exit_code(returncode: int) -> int:
  """A child's return code as a shell would report it (killed by signal N: 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


# Run as `python -c TRAMPOLINE <launcher pid> <command...>`: asks Linux to send the child SIGTERM when the launcher
# dies (even by SIGKILL), then execs the command in the same process. (A preexec_fn would do the same without
# an exec, but is unsafe when the caller has threads.)
TRAMPOLINE = ("import ctypes, os, signal, sys\n"
              "try:\n"
              "  ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
              "except (OSError, AttributeError):\n"
              "  pass\n"
              "if os.getppid() != int(sys.argv[1]):  # the launcher died before prctl\n"
              "  sys.exit(1)\n"
              "signal.signal(signal.SIGINT, signal.SIG_DFL)  # forwarded by the launcher: never inherited ignored\n"
              "os.execv(sys.argv[2], sys.argv[2:])\n")


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
  if not sys.platform.startswith("linux"):
    return cmd
  return [sys.executable, "-c", TRAMPOLINE, str(os.getpid()), *cmd]


class _Output:
  """Copies each child's lines, prefixed, to the console and unprefixed to its log file."""

  def __init__(self, stdout: TextIO, stderr: TextIO, log_dir: str | None, n: int):
    self._lock = threading.Lock()
    self._streams = {"out": stdout, "err": stderr}
    self._logs = []
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
      self._logs = [open(os.path.join(log_dir, f"process_{i}.log"), "w", encoding="utf-8") for i in range(n)]
    self._threads: list[threading.Thread] = []

  def follow(self, i: int, pipe, stream: str) -> None:
    t = threading.Thread(target=self._copy, args=(i, pipe, stream), daemon=True)
    t.start()
    self._threads.append(t)

  def _copy(self, i: int, pipe, stream: str) -> None:
    for raw in iter(pipe.readline, b""):
      line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
      with self._lock:
        console = self._streams[stream]
        console.write(f"[p{i}] {line}\n")
        console.flush()
        if self._logs:
          self._logs[i].write(line + "\n")
          self._logs[i].flush()
    pipe.close()

  def close(self, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for t in self._threads:
      t.join(max(0.0, deadline - time.monotonic()))
    for f in self._logs:
      f.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def launch(num_processes: int, devices_per_process: int, args: Sequence[str], *, port: int | None = None,
           log_dir: str | None = None, timeout: float | None = None, grace: float = 10.0,
           module: str = "dmd_jax.main", env: Mapping[str, str] | None = None, allow_cloud: bool = False,
           cwd: str | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
  """Runs ``num_processes`` children ``python -m module *args`` as one JAX job; returns the exit code (module
  docstring). ``env`` is the base environment (default ``os.environ``)."""
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
  if port is not None and not 0 < port < 65536:
    raise ValueError(f"port must be in 1..65535, got {port}")
  if timeout is not None and timeout <= 0:
    raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
  if grace < 0:
    raise ValueError(f"grace must be >= 0 seconds, got {grace}")
  stdout = stdout or sys.stdout
  stderr = stderr or sys.stderr
  base = dict(os.environ if env is None else env)
  port = port or free_port()
  cmd = [sys.executable, "-m", module, *args]

  def note(msg: str) -> None:
    stderr.write(f"[launch] {msg}\n")
    stderr.flush()

  note(f"{num_processes} processes × {devices_per_process} CPU devices, coordinator 127.0.0.1:{port}: "
       f"{shlex.join(cmd)}")
  procs: list[subprocess.Popen] = []
  output = _Output(stdout, stderr, log_dir, num_processes)
  received: list[int] = []

  def on_signal(sig, frame):
    del frame
    received.append(sig)
    if sig == signal.SIGINT and received.count(signal.SIGINT) > 1:
      note("second SIGINT: killing every process")
      for p in procs:
        _signal_group(p, signal.SIGKILL)
      return
    note(f"forwarding {signal.Signals(sig).name} to every process")
    for p in procs:
      if p.poll() is None:
        _signal_group(p, sig)

  handled = (signal.SIGTERM, signal.SIGINT)
  old_handlers = {}
  if threading.current_thread() is threading.main_thread():
    old_handlers = {s: signal.signal(s, on_signal) for s in handled}
  try:
    for i in range(num_processes):
      procs.append(subprocess.Popen(
          _with_parent_death_signal(cmd), env=child_env(base, i, num_processes, devices_per_process, port,
                                                        allow_cloud),
          cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          start_new_session=True))
      output.follow(i, procs[-1].stdout, "out")
      output.follow(i, procs[-1].stderr, "err")
    if received:   # a signal came while the children were starting: every child gets it
      for p in procs:
        _signal_group(p, received[-1])

    start = time.monotonic()
    first_failure: int | None = None
    kill_at: float | None = None       # when children still running after a failure get SIGKILL
    while True:
      codes = [p.poll() for p in procs]
      if first_failure is None:
        failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
          first_failure = _exit_code(codes[failed])
          if any(c is None for c in codes):
            note(f"process {failed} exited with {first_failure}; stopping the others")
            for p in procs:
              if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
            kill_at = time.monotonic() + grace
      if all(c is not None for c in codes):
        return first_failure or 0
      now = time.monotonic()
      if kill_at is not None and now > kill_at:
        note(f"processes still running {grace:g} s after SIGTERM: killing them")
        for p in procs:
          _signal_group(p, signal.SIGKILL)
        kill_at = None
      if timeout is not None and first_failure is None and now - start > timeout:
        note(f"timeout after {timeout:g} s: stopping every process")
        _stop_all(procs, grace)
        return TIMEOUT_EXIT_CODE
      time.sleep(0.05)
  finally:
    _stop_all(procs, grace if sys.exc_info()[0] is None else 0.0)
    output.close()
    for s, h in old_handlers.items():
      signal.signal(s, h)


def _stop_all(procs: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM to every running child's group, SIGKILL after ``grace`` s; then SIGKILL to every group (what a
  child left behind) and reap."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace
  while any(p.poll() is None for p in running) and time.monotonic() < deadline:
    time.sleep(0.05)
  for p in procs:
    _signal_group(p, signal.SIGKILL)
  for p in procs:
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits ``argv`` at the first ``--``: this script's flags before, dmd_jax.main's arguments after."""
  parser = argparse.ArgumentParser(
      prog="launch/local.py", description="N processes of dmd_jax.main on this machine (CPU devices).",
      usage="python launch/local.py --num_processes=N --devices_per_process=K [--port=P] [--log_dir=DIR] "
            "[--timeout=SECONDS] [--grace=SECONDS] [--allow_cloud] -- <arguments of dmd_jax.main>")
  parser.add_argument("--num_processes", type=int, required=True, help="Processes to start.")
  parser.add_argument("--devices_per_process", type=int, required=True, help="CPU devices of each process.")
  parser.add_argument("--port", type=int, default=None, help="Coordinator port on 127.0.0.1 (default: a free one).")
  parser.add_argument("--log_dir", default=None, help="Also write <log_dir>/process_<i>.log.")
  parser.add_argument("--timeout", type=float, default=None, help="Stop everything after this many seconds (exit 124).")
  parser.add_argument("--grace", type=float, default=10.0, help="Seconds between SIGTERM and SIGKILL when stopping.")
  parser.add_argument("--allow_cloud", action="store_true",
                      help="Keep cloud credentials and metadata variables (for gs:// paths from this machine).")
  parser.add_argument("--module", default="dmd_jax.main", help=argparse.SUPPRESS)   # tests: a stand-in child
  opts, rest = launchlib.split_args(parser, argv)
  for name in ("num_processes", "devices_per_process"):
    if getattr(opts, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(opts, name)}")
  if opts.port is not None and not 0 < opts.port < 65536:
    parser.error(f"--port must be in 1..65535, got {opts.port}")
  if opts.timeout is not None and opts.timeout <= 0:
    parser.error(f"--timeout must be > 0 seconds, got {opts.timeout:g}")
  if opts.grace < 0:
    parser.error(f"--grace must be >= 0 seconds, got {opts.grace:g}")
  return opts, rest


def main(argv: Sequence[str] | None = None) -> int:
  opts, rest = parse(sys.argv[1:] if argv is None else argv)
  return launch(opts.num_processes, opts.devices_per_process, rest, port=opts.port, log_dir=opts.log_dir,
                timeout=opts.timeout, grace=opts.grace, module=opts.module, allow_cloud=opts.allow_cloud)


if __name__ == "__main__":
  sys.exit(main())
