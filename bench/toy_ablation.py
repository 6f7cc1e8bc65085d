"""The toy2d report: variants and ablations of the embedded default and of DMD2 (``:dmd2``), each a full
training run.

    python bench/toy_ablation.py --out=runs/ablation [--only=default,no_regression] [--steps=N]

Prints a markdown table (TV, precision, smallest mode share, MMD² / floor, seconds) with the teacher's
Heun-18 samples for reference; the tables of docs/toy.md come from this script.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {
    "default": ("configs/toy2d.py", []),
    "no_regression": ("configs/toy2d.py", ["--config.regression.weight=0"]),
    "ratio5": ("configs/toy2d.py", ["--config.dmd.fake_updates_per_generator_update=5"]),
    "ratio5_no_regression": ("configs/toy2d.py", ["--config.dmd.fake_updates_per_generator_update=5",
                                                  "--config.regression.weight=0"]),
    "regression_only": ("configs/toy2d.py", ["--config.dmd.dm_weight=0"]),
    "unequal": ("configs/toy2d.py:unequal", []),
    # DMD2 (docs/method.md §7): no regression pairs; the ablation of the paper's table (DM only, + TTUR, + GAN)
    "dmd2": ("configs/toy2d.py:dmd2", []),
    "dmd2_ttur5": ("configs/toy2d.py:dmd2", ["--config.dmd.fake_updates_per_generator_update=5"]),
    "dmd2_ttur5_no_gan": ("configs/toy2d.py:dmd2", ["--config.dmd.fake_updates_per_generator_update=5",
                                                    "--config.gan.generator_weight=0", "--config.gan.critic_weight=0"]),
    "dmd2_critic_only": ("configs/toy2d.py:dmd2", ["--config.gan.generator_weight=0"]),
    "dmd2_gan_only": ("configs/toy2d.py:dmd2", ["--config.dmd.dm_weight=0", "--config.gan.generator_weight=1"]),
    # four steps with backward simulation: the toy's timesteps (:steps4, sigma 80, 0.32, 0.085, 0.04), the image
    # recipes' (sigma 80, 17.5, 2.5, 0.17), and two steps
    "dmd2_4step": ("configs/toy2d.py:dmd2,steps4", []),
    "dmd2_4step_image_timesteps": ("configs/toy2d.py:dmd2", ["--config.generator.steps=(999,749,499,249)"]),
    "dmd2_2step": ("configs/toy2d.py:dmd2", ["--config.generator.steps=(999,200)"]),
    "grid25": ("configs/toy2d.py:grid25", []),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/ablation")
  ap.add_argument("--only", default=",".join(RUNS))
  ap.add_argument("--steps", type=int, default=0, help="override num_train_steps (0 = the config's)")
  ap.add_argument("--eval_only", action="store_true",
                  help="re-evaluate the finished runs under --out (--mode=eval) instead of training")
  args = ap.parse_args()
  rows = []
  for name in args.only.split(","):
    config, extra = RUNS[name]
    workdir = os.path.join(args.out, name)
    cmd = [sys.executable, "-m", "dmd_jax.main", f"--config={os.path.join(ROOT, config)}",
           f"--workdir={workdir}", *extra]
    if args.steps:
      cmd.append(f"--config.num_train_steps={args.steps}")
    if args.eval_only:
      cmd.append("--mode=eval")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
      print(p.stderr[-3000:], file=sys.stderr)
      raise SystemExit(f"{name} failed")
    m = json.load(open(os.path.join(workdir, "metrics.json")))
    if args.eval_only:   # training times from the run, metrics from the fresh evaluation
      m.update({k: v for k, v in json.load(open(os.path.join(workdir, f"eval_step{m['steps']}.json"))).items()
                if k in ("generator", "teacher")})
      wall = m["total_seconds"]
    rows.append((name, m, wall))
    print(f"{name}: done in {wall:.0f} s", file=sys.stderr, flush=True)
  print("| run | samples | TV | precision | min mode share | MMD² / floor | train s | wall s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, m, wall in rows:
    g, t = m["generator"], m["teacher"]
    print(f"| {name} | generator, {m.get('generator_nfe', 1)} NFE | {g['tv']:.4f} | {g['precision']:.4f} | {g['min_mode_share']:.3f} | "
          f"{g['mmd2_ratio']:.2f} | {m['train_seconds']:.0f} | {wall:.0f} |")
    print(f"| | teacher Heun-18, 35 NFE | {t['tv']:.4f} | {t['precision']:.4f} | {t['min_mode_share']:.3f} | "
          f"{t['mmd2_ratio']:.2f} | | |")


if __name__ == "__main__":
  main()
