"""The digits study (docs/digits.md): one trained teacher, then DMD, DMD2 and their controls distilled from it on
one CPU, each run evaluated every 250 iterations, compared at equal generator updates and at equal training time.

    python bench/digits.py --out=runs/digits [--only=ROW,...] [--tiny] [--list]

Every row is a user command (printed as it runs) in its own workdir under ``--out``; a killed study resumes
where it stopped (the trainer resumes its checkpoint; a finished row is skipped), so the study can be run in
parts (``--only``). Run one part at a time: each run uses both cores of the 2-core machine it was sized for.

The rows (``ROWS``; seeds ``_s0`` / ``_s1`` of the headline rows):

  teacher          python -m dmd_jax.main --config=configs/digits.py --mode=teacher_train --workdir=OUT/teacher
  dmd_s*           :dmd — DM + regression on 1,000 teacher pairs, TTUR 1
  dm_ttur1         :dmd2 with both GAN weights 0, TTUR 1 — DM alone, the generator updated every iteration
  dm_ttur5         :dmd2 with both GAN weights 0 — DM alone under DMD2's two time-scale rule (the control)
  dmd2_s*          :dmd2 — DM + GAN (generator weight 3e-3, critic 1e-2), TTUR 5
  gan3e-2, gan1e-1 :dmd2 at generator GAN weights 3e-2 and 1e-1 (the official 3e-3 is dmd2_s0)
  dmd2_ttur2       :dmd2 at TTUR 2
  g3e-3_t500       :dmd2 with the critic's inputs noised at t < 500 (sigma <= 2.5) instead of the whole range
  g3e-3_c1_t500    the same with critic weight 1 (the official 1e-2 trains the head at the same Adam rate
                   but leaves the shared encoder to the denoising loss); g3e-2_c1_t500: and generator GAN 3e-2
  g0_c1_t500       the critic of g3e-3_c1_t500 trained, but the generator's GAN weight 0: the critic's cost to the
                   fake score that it shares its network with, apart from the GAN gradient
  steps4_from_dmd  :dmd2,steps4 initialised from dmd_s0 (DMD's one-step generator and fake score, a new head)
  steps4_s*        :dmd2,steps4 initialised from dmd2_s* (``--config.init_from.workdir``), lr 2e-5

All one-step rows train 1,250 iterations (TTUR 5: 250 generator updates); the four-step rows 600. The tables
read each row's ``eval_curve.json``: FID (digits classifier features, 898 samples against the held-out half)
at 250 generator updates, and at the shortest one-step row's training time. ``--tiny`` runs the same rows at
the ``:tiny`` sizes (a check of the script, not a result). The plot needs matplotlib (``pip install -e
'.[bench]'``).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits.py")
EVAL_EVERY = 250
NO_GAN = ["--config.gan.generator_weight=0", "--config.gan.critic_weight=0"]
T500 = ["--config.gan.max_timestep=500"]
C1 = ["--config.gan.critic_weight=1"]

# name -> (variant, extra flags, seed, the row it is initialised from)
ROWS = {
    "dmd2_s0": ("dmd2", [], 0, None),
    "dmd_s0": ("dmd", ["--config.evals.digits.teacher=True"], 0, None),   # also the teacher's Heun-18 row
    "dm_ttur5": ("dmd2", NO_GAN, 0, None),
    "gan3e-2": ("dmd2", ["--config.gan.generator_weight=3e-2"], 0, None),
    "gan1e-1": ("dmd2", ["--config.gan.generator_weight=1e-1"], 0, None),
    "steps4_s0": ("dmd2,steps4", [], 0, "dmd2_s0"),
    "dm_ttur1": ("dmd2", NO_GAN + ["--config.dmd.fake_updates_per_generator_update=1"], 0, None),
    "dmd2_ttur2": ("dmd2", ["--config.dmd.fake_updates_per_generator_update=2"], 0, None),
    "dmd2_s1": ("dmd2", [], 1, None),
    "dmd_s1": ("dmd", [], 1, None),
    "steps4_s1": ("dmd2,steps4", [], 1, "dmd2_s1"),
    # a critic that separates (bench/digits_critic.py): its inputs noised at t < 500 (sigma <= 2.5), and weight 1
    "g3e-3_t500": ("dmd2", T500, 0, None),
    "g3e-3_c1_t500": ("dmd2", T500 + C1, 0, None),
    "g3e-2_c1_t500": ("dmd2", T500 + C1 + ["--config.gan.generator_weight=3e-2"], 0, None),
    "steps4_from_dmd": ("dmd2,steps4", [], 0, "dmd_s0"),
    # the critic at weight 1 on t < 500 without the generator's GAN term: what the critic costs the fake score
    "g0_c1_t500": ("dmd2", T500 + C1 + ["--config.gan.generator_weight=0"], 0, None),
}
LABELS = {
    "dmd": "DMD (DM + regression, TTUR 1)", "dm_ttur1": "DM only, TTUR 1", "dm_ttur5": "DM only, TTUR 5",
    "dmd2": "DMD2 (DM + GAN 3e-3, TTUR 5)", "gan3e-2": "DMD2, GAN 3e-2", "gan1e-1": "DMD2, GAN 1e-1",
    "dmd2_ttur2": "DMD2, TTUR 2", "steps4": "DMD2 four steps, from DMD2 one step",
    "g3e-3_t500": "DMD2, critic t < 500", "g3e-3_c1_t500": "DMD2, critic 1 on t < 500",
    "g3e-2_c1_t500": "DMD2, critic 1 on t < 500, GAN 3e-2", "steps4_from_dmd": "DMD2 four steps, from DMD one step",
    "g0_c1_t500": "critic 1 on t < 500, generator GAN 0",
}


def cpu_flags() -> str:
  try:
    text = open("/proc/cpuinfo").read()
    flags = text.split("flags")[1].split("\n")[0]
  except (OSError, IndexError):
    return platform.processor() or "unknown CPU"
  have = [f for f in ("avx512f", "avx512_bf16", "avx2", "fma") if f" {f} " in flags + " "]
  model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
  return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of avx2/avx512'}"


def base(name: str) -> str:
  return name.rsplit("_s", 1)[0] if name[-3:-1] == "_s" else name


def command(name: str, out: str, tiny: bool) -> list[str]:
  t = ",tiny" if tiny else ""
  if name == "teacher":
    return ["--config=" + CONFIG + (":tiny" if tiny else ""), "--mode=teacher_train", f"--workdir={out}/teacher"]
  variant, extra, seed, parent = ROWS[name]
  cmd = [f"--config={CONFIG}:{variant}{t}", f"--config.teacher.path={out}/teacher/teacher",
         f"--config.seed={seed}", f"--config.evals.digits.every_steps={2 if tiny else EVAL_EVERY}", *extra,
         f"--workdir={out}/{name}"]
  if parent:
    cmd.append(f"--config.init_from.workdir={out}/{parent}")
  return cmd


def run(name: str, out: str, tiny: bool, times: dict) -> None:
  done = os.path.join(out, name, "metrics.json" if name != "teacher" else "teacher_train.json")
  if os.path.exists(done):
    print(f"{name}: done ({done})", flush=True)
    return
  cmd = [sys.executable, "-m", "dmd_jax.main"] + command(name, out, tiny)
  print("$ python -m dmd_jax.main", " ".join(cmd[3:]), flush=True)
  t, cpu = time.time(), _children_cpu()
  with open(os.path.join(out, f"{name}.log"), "a") as f:
    p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  times.setdefault(name, {"wall": 0.0, "cpu": 0.0})
  times[name]["wall"] += time.time() - t
  times[name]["cpu"] += _children_cpu() - cpu
  json.dump(times, open(os.path.join(out, "study_times.json"), "w"), indent=1)
  if p.returncode != 0:
    sys.exit(f"{name} failed (exit {p.returncode}); see {out}/{name}.log")


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _read(path):
  return json.load(open(path)) if os.path.exists(path) else None


def curves(out: str) -> dict:
  """name -> the rows of its eval_curve.json (step, generator_updates, train_seconds, digits metrics)."""
  got = {}
  for name in ROWS:
    c = _read(os.path.join(out, name, "eval_curve.json"))
    if c:
      got[name] = [dict(r["digits"], step=r["step"], updates=r["generator_updates"], seconds=r["train_seconds"])
                   for r in c if "digits" in r]
  return got


def at_updates(curve, updates):
  rows = [r for r in curve if r["updates"] <= updates]
  return rows[-1] if rows and rows[-1]["updates"] == updates else None


def at_seconds(curve, seconds):
  rows = [r for r in curve if r["seconds"] <= seconds * 1.0001]
  return rows[-1] if rows else None


def _mean(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  m = sum(values) / len(values)
  return m, (max(values) - min(values)) / 2 if len(values) > 1 else None, len(values)


def tables(out: str) -> dict:
  c = curves(out)
  one_step = {n: v for n, v in c.items() if not n.startswith("steps4") and v}
  finished = [v[-1]["seconds"] for n, v in one_step.items() if _read(os.path.join(out, n, "metrics.json"))]
  budget = min(finished) if finished else None
  groups = {}
  for name, curve in c.items():
    groups.setdefault(base(name), []).append((name, curve))
  result = {"wall_budget_seconds": budget, "updates": 250, "rows": {}}
  for group, members in groups.items():
    final = [m[-1] for _, m in members if _read(os.path.join(out, _, "metrics.json"))]
    row = {"label": LABELS.get(group, group), "seeds": len(members), "final": {}, "at_updates": {},
           "at_seconds": {}}
    for key, picks in (("final", final),
                       ("at_updates", [at_updates(m, 250) for _, m in members]),
                       ("at_seconds", [at_seconds(m, budget) for _, m in members] if budget else [])):
      for metric in ("fid", "precision", "recall", "class_accuracy", "step", "updates", "seconds"):
        mean, spread, n = _mean([p[metric] if p else None for p in picks])
        row[key][metric] = mean
        if metric == "fid":
          row[key]["fid_spread"], row[key]["n"] = spread, n
    result["rows"][group] = row
  dmd = _read(os.path.join(out, "dmd_s0", "metrics.json"))
  if dmd and "teacher" in dmd.get("digits", {}):
    result["teacher"] = dmd["digits"]["teacher"]
  if dmd:
    result["real_floor"] = dmd["digits"]["real_floor"]
  return result


def _f(v, spec=".2f"):
  return "–" if v is None else format(v, spec)


def _fid(r):
  if r.get("fid") is None:
    return "–"
  return f"{r['fid']:.2f}" + (f" ± {r['fid_spread']:.2f}" if r.get("fid_spread") is not None else "")


def markdown(t: dict) -> str:
  lines = [f"CPU: {t.get('cpu', '?')}; study time so far: {_f(t.get('study_wall_seconds'), '.0f')} s wall, "
           f"{_f(t.get('study_cpu_seconds'), '.0f')} s CPU", ""]
  if t.get("teacher"):
    lines.append(f"teacher (EDM Heun, 35 NFE): FID {t['teacher']['fid']:.2f}; real floor {t['real_floor']['fid']:.2f}")
    lines.append("")
  lines += ["| row | seeds | FID at 250 gen. updates | FID at "
            f"{_f(t.get('wall_budget_seconds'), '.0f')} s training (step) | final FID (step, s) | precision | recall |",
            "|---|---|---|---|---|---|---|"]
  for name, r in t["rows"].items():
    u, s, f = r["at_updates"], r["at_seconds"], r["final"]
    lines.append(f"| {r['label']} | {r['seeds']} | {_fid(u)} | {_fid(s)} ({_f(s.get('step'), '.0f')}) | "
                 f"{_fid(f)} ({_f(f.get('step'), '.0f')}, {_f(f.get('seconds'), '.0f')}) | "
                 f"{_f(f.get('precision'), '.3f')} | {_f(f.get('recall'), '.3f')} |")
  return "\n".join(lines)


def plot(out: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  c = curves(out)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  groups = sorted({base(n) for n in c}, key=list(map(base, c)).index)
  colour = {g: plt.cm.tab20(i % 20) for i, g in enumerate(groups)}   # a row's seeds share a colour
  for name, curve in c.items():
    label = LABELS.get(base(name), name) + (f" (seed {name[-1]})" if name[-3:-1] == "_s" else "")
    style = "--" if name.endswith("_s1") else "-"
    for ax, x in zip(axes, ("updates", "seconds")):
      ax.plot([r[x] for r in curve], [r["fid"] for r in curve], style, marker="o", ms=3, label=label,
              color=colour[base(name)])
  for ax, x in zip(axes, ("generator updates", "training seconds (2-core CPU)")):
    ax.set_xlabel(x)
    ax.set_ylabel("FID (digits features)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="runs/digits")
  ap.add_argument("--only", default="", help="comma-separated rows (default: the teacher and every row)")
  ap.add_argument("--tiny", action="store_true", help="the :tiny sizes (checks the script; not a result)")
  ap.add_argument("--list", action="store_true", help="print the rows' commands and stop")
  ap.add_argument("--plot", default="", help="also write the FID curves to this PNG")
  ap.add_argument("--record", default="", help="also write the tables, every row's curve and the times to this "
                  "JSON (docs/digits_study.json keeps the measured study)")
  args = ap.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  names = ["teacher", *ROWS]
  only = [s for s in args.only.split(",") if s] or names
  bad = sorted(set(only) - set(names))
  if bad:
    sys.exit(f"unknown rows {bad}; known: {', '.join(names)}")
  if args.list:
    for n in names:
      print(f"{n}: python -m dmd_jax.main {' '.join(command(n, out, args.tiny))}")
    return
  times = _read(os.path.join(out, "study_times.json")) or {}
  for name in names:
    if name in only:
      parent = ROWS.get(name, (None,) * 4)[3]
      if parent and not os.path.exists(os.path.join(out, parent, "metrics.json")):
        sys.exit(f"{name} starts from {parent}: run that row first")
      run(name, out, args.tiny, times)
  t = tables(out)
  t["cpu"] = cpu_flags()
  t["study_wall_seconds"] = sum(v["wall"] for v in times.values())
  t["study_cpu_seconds"] = sum(v["cpu"] for v in times.values())
  t["row_times"] = times
  t["curves"] = curves(out)
  json.dump(t, open(os.path.join(out, "study.json"), "w"), indent=1)
  if args.record:
    json.dump(t, open(args.record, "w"), indent=1)
  print(markdown(t))
  if args.plot:
    plot(out, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
  main()
