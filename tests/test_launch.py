"""The launchers in launch/: local.py end to end (a real dmd_jax.main job and a stand-in child), and the exact
commands tpu_vm.py, xpk.py and slurm.sbatch print with --dry_run, with their remote shell scripts run locally
against stand-ins for python, sudo, curl, srun and scontrol."""
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types

import pytest

from helpers import ROOT, TOY

LAUNCH = os.path.join(ROOT, "launch")
TESTS = os.path.dirname(os.path.abspath(__file__))


def _load(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local = _load("local")
tpu_vm = _load("tpu_vm")
xpk = _load("xpk")


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def _run(cmd, timeout=60, **kw):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def _local(*args, child=None, timeout=60, env=None):
  module = [] if child is None else ["--module=launch_child"]
  return _run([sys.executable, os.path.join(LAUNCH, "local.py"), *args[:args.index("--")], *module,
               *args[args.index("--"):]], timeout=timeout, env=env or _env())


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _wait_for(paths, timeout=30):
  t0 = time.time()
  while not all(os.path.exists(p) for p in paths):
    assert time.time() - t0 < timeout, f"not written within {timeout} s: {paths}"
    time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- local.py


def test_local_child_environment_output_and_logs(tmp_path):
  out, err = io.StringIO(), io.StringIO()
  base = _env(XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", SLURM_PROCID="3",
              SLURM_NTASKS="16", KUBERNETES_SERVICE_HOST="10.0.0.1", GOOGLE_APPLICATION_CREDENTIALS="/x.json")
  rc = local.launch(2, 3, [f"--dir={tmp_path}", "--mode=env"], module="launch_child", env=base, port=23456,
                    log_dir=str(tmp_path / "logs"), stdout=out, stderr=err)
  assert rc == 0
  for i in range(2):
    e = json.load(open(tmp_path / f"env_{i}.json"))
    assert e["JAX_PLATFORMS"] == "cpu"
    assert e["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3"
    assert e["JAX_COORDINATOR_ADDRESS"] == e["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:23456"
    assert (e["DMD_JAX_NUM_PROCESSES"], e["DMD_JAX_PROCESS_ID"]) == ("2", str(i))
    assert e["NO_GCE_CHECK"] == "true" and e["TPU_SKIP_MDS_QUERY"] == "1" and e["CLOUDSDK_CONFIG"] == os.devnull
    for k in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT", "GCE_METADATA_IP"):
      assert e[k].startswith("127.0.0.1:"), (k, e[k])
    assert e["GOOGLE_APPLICATION_CREDENTIALS"] is None
    assert e["SLURM_PROCID"] is None and e["SLURM_NTASKS"] is None and e["KUBERNETES_SERVICE_HOST"] is None
    assert open(tmp_path / "logs" / f"process_{i}.log").read() == f"hello from {i}\nwarning from {i}\n" or \
        open(tmp_path / "logs" / f"process_{i}.log").read() == f"warning from {i}\nhello from {i}\n"
  assert sorted(out.getvalue().splitlines()) == ["[p0] hello from 0", "[p1] hello from 1"]
  assert "[p0] warning from 0" in err.getvalue() and "[p1] warning from 1" in err.getvalue()
  assert "127.0.0.1:23456" in err.getvalue()


def test_local_runs_a_two_process_dmd_jax_job(tmp_path):
  w = tmp_path / "w"
  p = _local("--num_processes=2", "--devices_per_process=2", "--timeout=150", "--",
             f"--config={TOY}", f"--workdir={w}", "--mode=pairs", "--config.regression.num_pairs=64",
             "--config.regression.shard_size=32", "--config.batch_size=8", "--config.regression.batch_size=8",
             timeout=180, env=dict(os.environ))
  assert p.returncode == 0, p.stderr[-4000:]
  assert sorted(os.listdir(w / "pairs")) == [f"shard-0000{i}.{k}.npy" for i in (0, 1)
                                             for k in ("cond", "index", "x", "z")] + ["spec.json"]
  lines = (p.stdout + p.stderr).splitlines()
  assert any(l.startswith("[p0] ") for l in lines) and any(l.startswith("[p1] ") for l in lines)


def test_local_first_failure_code_and_the_others_are_stopped(tmp_path):
  t0 = time.time()
  p = _local("--num_processes=3", "--devices_per_process=1", "--grace=5", "--", f"--dir={tmp_path}",
             "--mode=fail", "--fail_id=1", "--code=3", child=True)
  assert p.returncode == 3, p.stderr
  assert time.time() - t0 < 20   # the others sleep 60 s
  assert "process 1 exited with 3" in p.stderr
  for i in (0, 2):
    assert not _alive(int(open(tmp_path / f"pid_{i}").read()))


def test_local_forwards_sigterm_to_every_process(tmp_path):
  proc = subprocess.Popen([sys.executable, os.path.join(LAUNCH, "local.py"), "--num_processes=2",
                           "--devices_per_process=1", "--module=launch_child", "--", f"--dir={tmp_path}",
                           "--mode=term"], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    _wait_for([tmp_path / "ready_0", tmp_path / "ready_1"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 42, err
  assert (tmp_path / "term_0").exists() and (tmp_path / "term_1").exists()
  assert "forwarding SIGTERM" in err


def test_local_timeout_kills_every_process_and_what_they_started(tmp_path):
  t0 = time.time()
  p = _local("--num_processes=2", "--devices_per_process=1", "--timeout=1.5", "--grace=2", "--",
             f"--dir={tmp_path}", "--mode=sleep", child=True)
  assert p.returncode == 124, p.stderr
  assert time.time() - t0 < 20
  assert "timeout after 1.5 s" in p.stderr
  for i in range(2):
    assert not _alive(int(open(tmp_path / f"pid_{i}").read()))
    assert not _alive(int(open(tmp_path / f"grandchild_{i}").read()))


def test_local_children_end_when_the_launcher_is_killed(tmp_path):
  proc = subprocess.Popen([sys.executable, os.path.join(LAUNCH, "local.py"), "--num_processes=2",
                           "--devices_per_process=1", "--module=launch_child", "--", f"--dir={tmp_path}",
                           "--mode=term"], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for([tmp_path / "ready_0", tmp_path / "ready_1"])
  finally:
    proc.kill()     # SIGKILL: no cleanup; the kernel sends the children SIGTERM (PR_SET_PDEATHSIG)
    proc.wait(timeout=10)
  _wait_for([tmp_path / "term_0", tmp_path / "term_1"], timeout=10)


@pytest.mark.parametrize("args,message", [
    (["--num_processes=2", "--devices_per_process=1", "--config=x"], "after '--'"),
    (["--num_processes=0", "--devices_per_process=1", "--", "x"], "--num_processes must be >= 1, got 0"),
    (["--num_processes=1", "--devices_per_process=1", "--port=70000", "--", "x"], "--port must be in 1..65535"),
    (["--num_processes=1", "--devices_per_process=1", "--"], "no arguments of dmd_jax.main"),
])
def test_local_usage_errors(args, message):
  p = _run([sys.executable, os.path.join(LAUNCH, "local.py"), *args])
  assert p.returncode == 2 and message in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------- tpu_vm.py

TPU = ["--name=dmd-coco", "--zone=us-west4-a", "--project=proj", "--run_id=r1"]
COCO = ["--config=configs/coco.py", "--config.teacher.path=gs://bucket/teachers/sd15",
        "--config.data.prompts_file=gs://bucket/prompts.txt", "--workdir=gs://bucket/runs/coco", "--prompt=a red bus"]


def _dry(script, *args):
  """The lines ``launch/<script> ARGS`` prints with --dry_run (put before ``--``)."""
  i = args.index("--") if "--" in args else len(args)
  p = _run([sys.executable, os.path.join(LAUNCH, script), *args[:i], "--dry_run", *args[i:]])
  assert p.returncode == 0, p.stderr
  return p.stdout.splitlines()


def _command_of(line):
  argv = shlex.split(line)
  return argv, next(a[len("--command="):] for a in argv if a.startswith("--command="))


def test_tpu_vm_dry_run_create_copy_setup_run():
  lines = _dry("tpu_vm.py", *TPU, "--create", "--accelerator_type=v5litepod-32",
               "--runtime_version=v2-alpha-tpuv5-lite", "--spot", "--extras=tpu,gcs,sd", "--", *COCO)
  scope = "--zone=us-west4-a --project=proj"
  assert lines[0] == f"gcloud compute tpus queued-resources describe dmd-coco {scope} '--format=value(state.state)'"
  assert lines[1] == (f"gcloud compute tpus queued-resources create dmd-coco --node-id=dmd-coco {scope} "
                      "--accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --spot")
  tar = shlex.split(lines[2])
  assert tar[:3] == ["tar", "-czf", tpu_vm.tarball_path("r1")] and tar[-3:] == ["-C", ROOT, "."]
  assert "--exclude=./.venv" in tar and "--exclude=./.git" in tar
  assert lines[3] == (f"gcloud compute tpus tpu-vm scp {tpu_vm.tarball_path('r1')} dmd-coco:dmd-jax-src.tgz "
                      f"{scope} --worker=all")
  argv, setup = _command_of(lines[4])
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dmd-coco", "--zone=us-west4-a",
                      "--project=proj"] and "--worker=all" in argv
  assert ".venv/bin/pip install -q -e '.[tpu,gcs,sd]'" in setup
  argv, run = _command_of(lines[5])
  assert "--worker=all" in argv
  assert "sudo rm -f /tmp/libtpu_lockfile" in run and "sudo lsof -t /dev/accel*" in run
  assert (".venv/bin/python -m dmd_jax.main --config.distributed=yes --config=configs/coco.py "
          "--config.teacher.path=gs://bucket/teachers/sd15 --config.data.prompts_file=gs://bucket/prompts.txt "
          "--workdir=gs://bucket/runs/coco '--prompt=a red bus'") in run
  assert "tee -a $L.log" in run and "L=logs/r1/worker$W; rm -f $L.exit;" in run
  argv, codes = _command_of(lines[6])
  assert "--worker=all" in argv and "dmd-jax/logs/r1/worker*.exit" in codes
  assert len(lines) == 7


def test_tpu_vm_dry_run_existing_slice_and_tiers():
  lines = _dry("tpu_vm.py", *TPU, "--skip_copy", "--", "--config=configs/toy2d.py", "--workdir=w",
               "--config.distributed=no")
  assert len(lines) == 2 and not any("queued-resources" in l for l in lines)
  _, run = _command_of(lines[0])
  assert "dmd_jax.main --config=configs/toy2d.py --workdir=w --config.distributed=no;" in run
  best = _dry("tpu_vm.py", *TPU, "--create", "--accelerator_type=v5p-64", "--runtime_version=v2-alpha-tpuv5",
              "--best_effort", "--", "--workdir=w")[1]
  assert best.startswith("gcloud alpha compute tpus queued-resources create dmd-coco ") and best.endswith(
      " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --best-effort")
  reserved = _dry("tpu_vm.py", *TPU, "--create", "--accelerator_type=v5p-64", "--runtime_version=v",
                  "--reserved", "--", "--workdir=w")[1]
  assert reserved.startswith("gcloud compute") and reserved.endswith(" --reserved")
  stop = _dry("tpu_vm.py", *TPU, "--stop")
  assert len(stop) == 1 and "--worker=all" in stop[0] and "xargs -r sudo kill -TERM" in stop[0]


@pytest.mark.parametrize("args,message", [
    (["--create", "--runtime_version=v", "--", "x"], "--create needs --accelerator_type"),
    (["--spot", "--", "x"], "only go with --create"),
    (["--create", "--accelerator_type=a", "--runtime_version=v", "--spot", "--reserved", "--", "x"],
     "not allowed with argument"),
    (["--extras=tpu gcs", "--", "x"], "--extras='tpu gcs'"),
    (["--max_restarts=-1", "--", "x"], "--max_restarts must be >= 0"),
    (["x"], "after '--'"),
])
def test_tpu_vm_usage_errors(args, message):
  p = _run([sys.executable, os.path.join(LAUNCH, "tpu_vm.py"), *TPU, *args])
  assert p.returncode == 2 and message in p.stderr, p.stderr


@pytest.fixture
def fake_worker(tmp_path):
  """A worker's home with a stand-in .venv/bin/python (prints its argv, exits $FAKE_RC) and sudo / curl."""
  home, bin_ = tmp_path / "home", tmp_path / "bin"
  (home / "dmd-jax" / ".venv" / "bin").mkdir(parents=True)
  bin_.mkdir()
  scripts = {home / "dmd-jax" / ".venv" / "bin" / "python":
             'for a in "$@"; do echo "[$a]"; done; echo "to stderr" >&2; exit ${FAKE_RC:-0}',
             bin_ / "sudo": "exit 0", bin_ / "curl": 'echo "$FAKE_WORKER"'}
  for path, body in scripts.items():
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)

  def run(script, **env):
    return subprocess.run(["sh", "-c", script], cwd=home, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", HOME=str(home), **env))
  return types.SimpleNamespace(home=home, bin=bin_, run=run)


def test_tpu_vm_run_script_on_workers(fake_worker):
  o = tpu_vm.parser().parse_args(TPU)
  script = tpu_vm.run_remote(o, ["--config=configs/coco.py", "--prompt=a red bus", "--x=it's"], "r1")
  argv = "".join(f"[{a}]\n" for a in ["-m", "dmd_jax.main", "--config.distributed=yes", "--config=configs/coco.py",
                                       "--prompt=a red bus", "--x=it's"])
  logs = fake_worker.home / "dmd-jax" / "logs" / "r1"
  p0 = fake_worker.run(script, FAKE_WORKER="0", FAKE_RC="42")
  assert p0.returncode == 42 and p0.stdout == argv + "to stderr\n"          # worker 0 streams
  p1 = fake_worker.run(script, FAKE_WORKER="1", FAKE_RC="0")
  assert p1.returncode == 0 and p1.stdout == ""                             # the others only log
  assert (logs / "worker1.log").read_text() == argv + "to stderr\n"
  assert (logs / "worker0.log").read_text() == argv + "to stderr\n"
  codes = fake_worker.run(tpu_vm.exit_codes_remote(o, "r1"))
  assert tpu_vm.parse_exit_codes(codes.stdout) == {0: 42, 1: 0}
  p0 = fake_worker.run(script, FAKE_WORKER="0", FAKE_RC="0")             # a restart: appends, new exit code
  assert p0.returncode == 0 and (logs / "worker0.log").read_text() == 2 * (argv + "to stderr\n")
  assert tpu_vm.parse_exit_codes(fake_worker.run(tpu_vm.exit_codes_remote(o, "r1")).stdout) == {0: 0, 1: 0}
  assert tpu_vm.outcome({0: 42, 1: 0}) == 42 and tpu_vm.outcome({0: 42, 1: 3}) == 3
  assert tpu_vm.outcome({0: 0, 1: 0}) == 0 and tpu_vm.outcome({}) is None


def test_tpu_vm_setup_script_unpacks_and_installs_once(fake_worker, tmp_path):
  pip_log = tmp_path / "pip.log"
  fake_python = fake_worker.bin / "fakepython"   # `fakepython -m venv .venv` makes a .venv with a logging pip
  fake_python.write_text("#!/bin/sh\nmkdir -p \"$3/bin\"\n"
                         f"printf '#!/bin/sh\\necho \"$*\" >> {pip_log}\\n' > \"$3/bin/pip\"\n"
                         "chmod +x \"$3/bin/pip\"\n")
  fake_python.chmod(0o755)
  o = tpu_vm.parser().parse_args(TPU + ["--python=fakepython", "--extras=tpu,gcs"])
  tarball = tmp_path / "src.tgz"
  assert _run(tpu_vm.tar_command(str(tarball))).returncode == 0
  for _ in range(2):
    (fake_worker.home / tpu_vm.SOURCE_TARBALL).write_bytes(tarball.read_bytes())
    p = fake_worker.run(tpu_vm.setup_remote(o))
    assert p.returncode == 0, p.stderr
  rd = fake_worker.home / "dmd-jax"
  assert (rd / "setup.py").exists() and (rd / "dmd_jax" / "main.py").exists() and not (rd / "tests").exists()
  assert not (fake_worker.home / tpu_vm.SOURCE_TARBALL).exists()
  assert pip_log.read_text() == "install -q -U pip\ninstall -q -e .[tpu,gcs]\n"   # the second setup: no install
  assert (rd / ".venv" / "dmd_jax_extras").read_text() == "tpu,gcs\n"


class _FakeRunner:
  """Stands in for launchlib.Runner: records commands; scripted exit codes and queued-resource states."""

  def __init__(self, exit_lines, states):
    self.dry_run, self.commands, self.exit_lines, self.states = False, [], list(exit_lines), list(states)

  def run(self, cmd, capture=False, check=True):
    self.commands.append(cmd)
    out, rc = "", 0
    if "describe" in cmd:
      state = self.states.pop(0)
      out, rc = (state or "", 0 if state else 1)
    elif any(a.startswith("--command=for f in") for a in cmd):
      out = self.exit_lines.pop(0)
    return subprocess.CompletedProcess(cmd, rc, out, "")


def _kinds(commands):
  kinds = []
  for c in commands:
    command = next((a for a in c if a.startswith("--command=")), "")
    kinds.append("create" if "create" in c else "delete" if "delete" in c else "describe" if "describe" in c
                 else "tar" if c[0] == "tar" else "scp" if "scp" in c else "setup" if "set -e" in command
                 else "run" if "dmd_jax.main" in command else "codes" if "for f in" in command else str(c))
  return kinds


def test_tpu_vm_restarts_after_preemption_and_recreates_a_lost_slice(monkeypatch):
  monkeypatch.setattr(tpu_vm, "POLL_SECONDS", 0)
  o = tpu_vm.parser().parse_args(TPU + ["--create", "--accelerator_type=v5litepod-32", "--runtime_version=v",
                                        "--spot", "--restart_on_preemption"])
  runner = _FakeRunner(
      exit_lines=["dmd_jax_exit worker0 42\ndmd_jax_exit worker1 42\n",   # preempted, slice still ACTIVE
                  "",                                                     # ssh lost: the spot slice went away
                  "dmd_jax_exit worker0 0\ndmd_jax_exit worker1 0\n"],
      states=[None, "WAITING_FOR_RESOURCES", "ACTIVE",     # created, waited for
              "ACTIVE",                                     # after the first 42: rerun at once
              "SUSPENDED", "SUSPENDED", None, "ACTIVE",    # lost: deleted, gone, created again
              ])
  assert tpu_vm.Slice(o, ["--workdir=w"], runner).main() == 0
  assert _kinds(runner.commands) == [
      "describe", "create", "describe", "describe", "tar", "scp", "setup", "run", "codes",
      "describe", "run", "codes",
      "describe", "describe", "delete", "describe", "create", "describe", "tar", "scp", "setup", "run", "codes"]
  assert not runner.states and not runner.exit_lines


def test_tpu_vm_gives_up_on_failures_and_after_max_restarts(monkeypatch):
  o = tpu_vm.parser().parse_args(TPU + ["--skip_copy", "--restart_on_preemption", "--max_restarts=1"])
  runner = _FakeRunner(["dmd_jax_exit worker0 42\n", "dmd_jax_exit worker0 42\n"], [])
  assert tpu_vm.Slice(o, ["--workdir=w"], runner).main() == 42
  assert _kinds(runner.commands) == ["run", "codes", "run", "codes"]
  runner = _FakeRunner(["dmd_jax_exit worker0 0\ndmd_jax_exit worker1 7\n"], [])
  assert tpu_vm.Slice(o, ["--workdir=w"], runner).main() == 7
  assert _kinds(runner.commands) == ["run", "codes"]


# ---------------------------------------------------------------------------------------------- xpk.py


def test_xpk_dry_run():
  image = "us-docker.pkg.dev/proj/repo/dmd-jax:v1"
  lines = _dry("xpk.py", "--cluster=tpu-cluster", "--workload=dmd-coco", "--tpu_type=v5litepod-32",
               "--num_slices=2", f"--docker_image={image}", "--build", "--extras=tpu,gcs,sd", "--max_restarts=5",
               "--project=proj", "--zone=us-west4-a", "--env=TPU_STDERR_LOG_LEVEL=0", "--", *COCO)
  assert lines[0] == (f"docker build -f {ROOT}/launch/Dockerfile --build-arg EXTRAS=tpu,gcs,sd -t {image} {ROOT}")
  assert lines[1] == f"docker push {image}"
  argv = shlex.split(lines[2])
  assert argv == ["xpk", "workload", "create", "--cluster=tpu-cluster", "--workload=dmd-coco",
                  "--tpu-type=v5litepod-32", "--num-slices=2", f"--docker-image={image}",
                  "--command=cd /app && exec python -m dmd_jax.main " + shlex.join(COCO), "--max-restarts=5",
                  "--termination-grace-period-seconds=300", "--env=TPU_STDERR_LOG_LEVEL=0", "--project=proj",
                  "--zone=us-west4-a"]
  assert "'--prompt=a red bus'" in argv[8]
  assert len(lines) == 3
  gpu = shlex.split(_dry("xpk.py", "--cluster=c", "--workload=w1", "--device_type=h100-80gb-8", "--num_nodes=4",
                         "--docker_image=i", "--wait", "--", "--workdir=w")[0])
  assert "--device-type=h100-80gb-8" in gpu and "--num-nodes=4" in gpu and "--num-slices=1" in gpu


@pytest.mark.parametrize("args,message", [
    (["--workload=Dmd", "--tpu_type=t"], "--workload='Dmd'"),
    (["--workload=w", "--tpu_type=t", "--device_type=d"], "not allowed with argument"),
    (["--workload=w", "--tpu_type=t", "--num_nodes=2"], "with --device_type only"),
    (["--workload=w", "--tpu_type=t", "--env=1A=b"], "--env='1A=b': expected KEY=VALUE"),
])
def test_xpk_usage_errors(args, message):
  p = _run([sys.executable, os.path.join(LAUNCH, "xpk.py"), "--cluster=c", "--docker_image=i", *args, "--", "x"])
  assert p.returncode == 2 and message in p.stderr, p.stderr


def test_dockerfile_installs_the_package_with_extras():
  text = open(os.path.join(LAUNCH, "Dockerfile")).read()
  assert "ARG EXTRAS=tpu,gcs" in text and 'pip install ".[${EXTRAS}]"' in text and "pip install --no-deps -e ." in text
  assert "WORKDIR /app" in text and xpk.APP_DIR == "/app"


# ---------------------------------------------------------------------------------------------- slurm.sbatch

SBATCH = os.path.join(LAUNCH, "slurm.sbatch")


def test_slurm_dry_run_prints_the_srun_line():
  p = _run(["bash", SBATCH, "--dry_run", "--", *COCO])
  assert p.returncode == 0, p.stderr
  assert shlex.split(p.stdout) == ["srun", "python", "-m", "dmd_jax.main", *COCO]
  assert p.stdout.count("\n") == 1
  p = _run(["bash", SBATCH, "--dry_run", "--", "--workdir=w"], env=dict(os.environ, DMD_JAX_PYTHON="/v/bin/python"))
  assert p.stdout == "srun /v/bin/python -m dmd_jax.main --workdir=w\n"


@pytest.mark.parametrize("args,message", [
    (["--bogus", "--", "x"], "unknown option '--bogus'"), (["--dry_run"], "no arguments of dmd_jax.main"),
    (["--", "x"], "not inside a SLURM job")])
def test_slurm_usage_errors(args, message):
  env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
  p = _run(["bash", SBATCH, *args], env=env)
  assert p.returncode == 2 and message in p.stderr, p.stderr


@pytest.fixture
def fake_slurm(tmp_path):
  """srun (records its argv and JAX_LOCAL_DEVICE_IDS, exits $FAKE_RC; with FAKE_WAIT, waits for SIGTERM) and
  scontrol (records its argv)."""
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  (bin_ / "srun").write_text(
      "#!/bin/bash\n"
      f"echo \"$* | ${{JAX_LOCAL_DEVICE_IDS:-unset}}\" > {tmp_path}/srun.log\n"
      f"if [ -n \"${{FAKE_WAIT:-}}\" ]; then trap 'echo term > {tmp_path}/term; exit 42' TERM; "
      f"touch {tmp_path}/ready; for i in $(seq 300); do sleep 0.1; done; fi\n"
      "exit ${FAKE_RC:-0}\n")
  (bin_ / "scontrol").write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path}/scontrol.log\n")
  for f in bin_.iterdir():
    f.chmod(0o755)

  def env(**kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="77", **kw)
    return e
  return types.SimpleNamespace(dir=tmp_path, env=env)


def test_slurm_requeues_on_exit_42_only(fake_slurm):
  d = fake_slurm.dir
  p = _run(["bash", SBATCH, "--", "--workdir=w"], env=fake_slurm.env(FAKE_RC="42", SLURM_GPUS_ON_NODE="4"))
  assert p.returncode == 42, p.stderr
  assert (d / "scontrol.log").read_text() == "requeue 77\n"
  assert (d / "srun.log").read_text() == "python -m dmd_jax.main --workdir=w | 0,1,2,3\n"
  (d / "scontrol.log").unlink()
  p = _run(["bash", SBATCH, "--", "--workdir=w"],
           env=fake_slurm.env(FAKE_RC="3", SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8"))
  assert p.returncode == 3 and not (d / "scontrol.log").exists()
  assert (d / "srun.log").read_text().endswith("| unset\n")           # one process per GPU: JAX picks it
  p = _run(["bash", SBATCH, "--", "--workdir=w"], env=fake_slurm.env(FAKE_RC="42", SLURM_RESTART_COUNT="20"))
  assert p.returncode == 42 and not (d / "scontrol.log").exists() and "requeues done" in p.stderr


def test_slurm_passes_sigterm_to_the_step(fake_slurm):
  d = fake_slurm.dir
  proc = subprocess.Popen(["bash", SBATCH, "--", "--workdir=w"], env=fake_slurm.env(FAKE_WAIT="1"), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for([d / "ready"])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 42 and (d / "term").read_text() == "term\n"
  assert (d / "scontrol.log").read_text() == "requeue 77\n"
