"""The image-space proof on one CPU (docs/digits.md): trains the digits teacher, distils it with DMD and DMD2 (one
and four steps), and prints the table of README.md / docs/benchmarks.md.

    python bench/digits.py --out=runs/digits [--only=teacher,dmd,...] [--tiny]

Every stage is a user command (printed as it runs) in its own workdir under ``--out``, so a rerun resumes what
a killed one left and skips what is finished:

  teacher        python -m dmd_jax.main --config=configs/digits.py --mode=teacher_train --workdir=OUT/teacher
  dmd            python -m dmd_jax.main --config=configs/digits.py:dmd --config.teacher.path=OUT/teacher/teacher
                     --config.eval.digits_teacher=True --workdir=OUT/dmd      (also the teacher's Heun-18 row)
  teacher_1step  python -m dmd_jax.main --config=configs/digits.py:dmd ... --workdir=OUT/dmd --mode=eval --at_init
  dmd2           python -m dmd_jax.main --config=configs/digits.py:dmd2 ... --workdir=OUT/dmd2
  dmd2_4step     python -m dmd_jax.main --config=configs/digits.py:dmd2,steps4 ... --workdir=OUT/dmd2_4step

``--tiny`` runs the same stages with the ``:tiny`` sizes (a check of the script in a few minutes, not a result).
The table: FID in the digits classifier's features against the 1,797 real digits, class accuracy, k-NN
precision / recall (k = 3), near-copies of training images, NFE, wall time of the stage's training, with the
CPU's flags.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("teacher", "dmd", "teacher_1step", "dmd2", "dmd2_4step")
ABLATIONS = ("dmd2_ttur1",)     # run only when named in --only
CONFIG = os.path.join(ROOT, "configs", "digits.py")


def cpu_flags() -> str:
  try:
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0]
  except (OSError, IndexError):
    return platform.processor() or "unknown CPU"
  have = [f for f in ("avx512f", "avx512_bf16", "avx2", "fma") if f" {f} " in flags + " "]
  model = ""
  for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
      model = line.split(":", 1)[1].strip()
      break
  return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of avx2/avx512'}"


def run(cmd: list[str], log: str) -> float:
  print("$", " ".join(cmd[1:]), flush=True)
  t = time.time()
  with open(log, "a") as f:
    p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if p.returncode != 0:
    sys.exit(f"failed (exit {p.returncode}); see {log}")
  return time.time() - t


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/digits")
  ap.add_argument("--only", default=",".join(STAGES),
                  help=f"comma-separated subset of {','.join(STAGES + ABLATIONS)}")
  ap.add_argument("--tiny", action="store_true", help="the :tiny sizes (checks the script; not a result)")
  args = ap.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  only = [s for s in args.only.split(",") if s]
  bad = sorted(set(only) - set(STAGES) - set(ABLATIONS))
  if bad:
    sys.exit(f"unknown stages {bad}; known: {', '.join(STAGES + ABLATIONS)}")
  tiny = ",tiny" if args.tiny else ""
  teacher = os.path.join(out, "teacher", "teacher")
  main_cmd = [sys.executable, "-m", "dmd_jax.main"]
  with_teacher = [f"--config.teacher.path={teacher}"]
  commands = {
      "teacher": [f"--config={CONFIG}{tiny.replace(',', ':', 1)}", "--mode=teacher_train",
                  f"--workdir={out}/teacher"],
      "dmd": [f"--config={CONFIG}:dmd{tiny}", *with_teacher, "--config.eval.digits_teacher=True",
              f"--workdir={out}/dmd"],
      "teacher_1step": [f"--config={CONFIG}:dmd{tiny}", *with_teacher, "--mode=eval", "--at_init",
                        f"--workdir={out}/dmd"],
      "dmd2": [f"--config={CONFIG}:dmd2{tiny}", *with_teacher, f"--workdir={out}/dmd2"],
      "dmd2_4step": [f"--config={CONFIG}:dmd2,steps4{tiny}", *with_teacher, f"--workdir={out}/dmd2_4step"],
      # DMD2 with one fake-score update per generator update (5x the generator updates of :dmd2)
      "dmd2_ttur1": [f"--config={CONFIG}:dmd2{tiny}", *with_teacher, "--config.dmd.fake_updates_per_generator_update=1",
                     f"--workdir={out}/dmd2_ttur1"],
  }
  wall = {}
  for stage in STAGES + ABLATIONS:
    if stage in only:
      wall[stage] = run(main_cmd + commands[stage], os.path.join(out, f"{stage}.log"))
  table = collect(out)
  table["cpu"] = cpu_flags()
  table["stage_wall_seconds"] = wall
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump(table, f, indent=1)
  print(markdown(table))


def _read(path):
  return json.load(open(path)) if os.path.exists(path) else None


def collect(out: str) -> dict:
  """The rows from the stages' result files (whatever exists)."""
  rows = {}
  t = _read(os.path.join(out, "teacher", "teacher_train.json"))
  dmd = _read(os.path.join(out, "dmd", "metrics.json"))
  if dmd:
    d = dmd["digits"]
    rows["real digits (split halves)"] = dict(d["real_floor"], nfe=None, seconds=None)
    if "teacher" in d:
      rows[f"teacher, EDM Heun ({dmd['teacher_nfe']} NFE)"] = dict(d["teacher"], nfe=dmd["teacher_nfe"],
                                          seconds=t["train_seconds"] if t else None,
                                          total_seconds=t["total_seconds"] if t else None)
  init = _read(os.path.join(out, "dmd", "eval_init.json"))
  if init:
    rows["teacher, 1 Euler step"] = dict(init["digits"], nfe=1, seconds=None)
  for name, folder in (("DMD, 1 step", "dmd"), ("DMD2, 1 step", "dmd2"), ("DMD2, 4 steps", "dmd2_4step"),
                       ("DMD2, 1 step, TTUR 1 (ablation)", "dmd2_ttur1")):
    m = _read(os.path.join(out, folder, "metrics.json"))
    if m:
      rows[name] = dict(m["digits"], nfe=m["generator_nfe"], seconds=m["train_seconds"],
                        total_seconds=m["total_seconds"], steps=m["steps"])
  extra = {}
  if dmd:
    extra["classifier_held_out_accuracy"] = dmd["digits"].get("classifier_held_out_accuracy")
  return {"rows": rows, **extra}


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def markdown(table: dict) -> str:
  lines = [f"CPU: {table.get('cpu', '?')}; classifier held-out accuracy "
           f"{_fmt(table.get('classifier_held_out_accuracy'), '.3f')}", "",
           "| | FID | class acc. | precision | recall | near-copies | NFE | train s | command s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in table["rows"].items():
    lines.append(f"| {name} | {_fmt(r.get('fid'), '.2f')} | {_fmt(r.get('class_accuracy'), '.3f')} | "
                 f"{_fmt(r.get('precision'), '.3f')} | {_fmt(r.get('recall'), '.3f')} | "
                 f"{_fmt(r.get('near_copies'), '.3f')} | {_fmt(r.get('nfe'), 'd')} | "
                 f"{_fmt(r.get('seconds'), '.0f')} | {_fmt(r.get('total_seconds'), '.0f')} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
