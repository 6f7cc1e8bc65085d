"""DMD step time and compiled memory of the EDM ImageNet-64 ADM (DhariwalUNet, 295,899,267 parameters).

    python bench/edm_step.py                                     # full size, batch 2 per device, f32 + bf16
    python bench/edm_step.py --config=imagenet64_tiny --repeats=2          # a quick check (tiny random ADM)
    python bench/edm_step.py --batch_per_device=8 --dtype=bfloat16 --remat=off,on --out=edm_step.md

Everything is the real code path: a random-weight teacher in the published checkpoint's shape is written with
``dmd_jax.families.edm.convert.write_random_teacher`` (once, cached under ``--workdir``), ``configs/imagenet64.py`` points
``teacher.path`` at it, and ``dmd_jax.train.setup`` builds the teacher (``families.build``), the optimizers
(``train.make_hyper``), the mesh, the shardings and the initial state (generator and fake score copied from the
teacher, AdamW states). Three functions are jitted with those shardings and the state donated, as
``train.py`` does:

- generator step: ``dmd.generator_update`` (generator forward/backward, teacher and fake-score forwards for the
  DM loss, the regression term on ``regression.batch_size`` pairs with the config's distance, LPIPS by
  default with random VGG weights, AdamW);
- fake-score step: ``dmd.fake_score_update`` (fake-score forward/backward on detached samples, AdamW);
- full DMD iteration: ``dmd.train_step`` (both of the above in one program, as training runs it).

For each: compile time (``lower`` + ``compile``), the median wall time of ``--repeats`` calls after
``--warmup`` calls, XLA's ``compiled.memory_analysis()`` (temp, argument, output, alias, generated code; per
device) and XLA's flop count (``cost_analysis``), and the process's host memory once the row is done: resident now (``VmRSS``)
and its peak so far (``ru_maxrss``; ``bench/host_memory.py``). The global batch is ``batch_per_device`` times the number of
devices, for the DM batch and the regression batch alike. Weights are random: timing does not depend on them.
Prints a Markdown table (rows as they finish) and, with ``--out``, writes it to a file after every row.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common as bench_common  # noqa: E402
from bench.common import MIB, host_arrays, measure, nbytes, rss, rss_text  # noqa: E402
from dmd_jax import config_lib, sharding, streams, train  # noqa: E402
from dmd_jax.families.edm import convert as edm_convert  # noqa: E402
from dmd_jax.models.attention import IMPLEMENTATIONS  # noqa: E402

# The init_kwargs edm-imagenet-64x64-cond-adm.pkl records (EDM's train.py --arch=adm --dropout=0.1 --augment=0
# --fp16=1; DhariwalUNet / EDMPrecond defaults for the rest); shared/docs/references.md.
IMAGENET_ADM = dict(
    img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, sigma_data=0.5,
    model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.1, label_dropout=0.0, augment_dim=0)
IMAGENET_ADM_PARAMS = 295_899_267

CONFIGS = {"imagenet64": "", "imagenet64_tiny": "tiny"}
STEPS = ("generator step", "fake-score step", "full DMD iteration")


def load_config(name: str):
  if name not in CONFIGS:
    raise ValueError(f"--config must be one of {sorted(CONFIGS)}, got {name!r}")
  return config_lib.load("imagenet64", CONFIGS[name])


def random_teacher_dir(workdir: str, seed: int) -> str:
  """The full-size random-weight ADM teacher, written once through the real converter."""
  dst = os.path.join(workdir, "edm-imagenet-64x64-cond-adm-random")
  if not os.path.exists(os.path.join(dst, "config.json")):
    t0 = time.perf_counter()
    print(f"writing a random-weight ADM teacher to {dst} ...", file=sys.stderr, flush=True)
    edm_convert.write_random_teacher(dst, IMAGENET_ADM, seed=seed)
    gc.collect()
    print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return dst


def make_config(args, dtype: str, remat: bool, workdir: str):
  config = load_config(args.config)
  config.model.dtype = dtype
  config.model.remat = remat
  config.model.attention = args.attention
  n_dev = jax.device_count()
  config.batch_size = args.batch_per_device * n_dev
  config.regression.batch_size = args.batch_per_device * n_dev
  config.mesh.fsdp = args.fsdp
  if args.regression_distance:
    config.regression.distance = args.regression_distance
  if config.regression.get("distance") == "lpips" and not config.regression.get("lpips_path"):
    config.regression.lpips_path = "random"      # random VGG weights: the same compute
  if args.config == "imagenet64":
    config.teacher.path = random_teacher_dir(workdir, config.seed)
  return config


def bench_one(args, dtype: str, remat: bool, workdir: str, emit) -> None:
  config = make_config(args, dtype, remat, workdir)
  t0 = time.perf_counter()
  setup = train.setup(config, os.path.join(workdir, f"run-{args.config}"))
  nets, mesh = setup.teacher, setup.mesh
  print(f"[{dtype}, remat={remat}] after train.setup: {rss_text()}; host arrays reachable from the teacher: "
        f"{nbytes(host_arrays(setup.teacher)) / MIB:,.1f} MiB", file=sys.stderr, flush=True)
  state = setup.init_state()
  jax.block_until_ready(state)
  print(f"[{dtype}, remat={remat}] networks, state: {time.perf_counter() - t0:.0f} s; {rss_text()}", file=sys.stderr,
        flush=True)

  B = config.batch_size
  batch_sh = sharding.batch_sharding(mesh)

  # Per-step inputs, drawn as train_step draws them (fold_in(key, step), split 4).
  step_key = streams.key(config.seed, "train")
  r_z, r_c, r_dm, r_fake = jax.random.split(jax.random.fold_in(step_key, 0), 4)
  r_rz, r_rx, r_rc = jax.random.split(jax.random.PRNGKey(123), 3)
  put = lambda a: jax.device_put(a, batch_sh)
  z, cond = put(nets.sample_noise(r_z, B)), put(nets.conditions.draw(r_c, B))
  batch = {}
  if config.regression.weight > 0:
    rb = config.regression.batch_size
    batch = {"reg_z": put(nets.sample_noise(r_rz, rb)), "reg_x": put(0.5 * nets.sample_noise(r_rx, rb)),
             "reg_cond": put(nets.conditions.draw(r_rc, rb))}
  x_fake = put(jnp.clip(0.5 * nets.sample_noise(r_fake, B), -1, 1))   # stands for detached generator samples

  common = dict(warmup=args.warmup, repeats=args.repeats)
  base = dict(dtype=dtype, remat=remat, batch_per_device=args.batch_per_device, global_batch=B)

  # ---- generator step ----
  if "generator" in args.steps:
    _gen_row(setup, state, z, cond, batch, r_dm, common, base, emit)
  if "fake_score" in args.steps:
    _fake_row(setup, state, x_fake, cond, r_fake, common, base, emit)
  if "full" in args.steps:
    jitted = setup.jit_train_step(batch)
    full_args = (state, setup.frozen, batch, step_key)
    del state
    row, full_args = measure(_reporting_rss(jitted, STEPS[2]), full_args, lambda a, out: (out[0],) + a[1:], **common,
                             run=not args.full_compile_only)
    del full_args, jitted
    emit({**base, "step": STEPS[2], **row})
  del setup, nets
  gc.collect()


class _reporting_rss:
  """``jitted`` for ``bench.common.measure``, printing the host RSS once compiled (before the first call)."""

  def __init__(self, jitted, label: str):
    self.jitted, self.label = jitted, label

  def lower(self, *args):
    lowered = self.jitted.lower(*args)

    def compile_():
      compiled = lowered.compile()
      gc.collect()
      print(f"    {self.label} compiled: {rss_text()}", file=sys.stderr, flush=True)
      return compiled
    return type("Lowered", (), {"compile": staticmethod(compile_)})()


def _gen_row(setup, state, z, cond, batch, r_dm, common, base, emit):
  jitted = _reporting_rss(setup.jit_generator_step(batch), STEPS[0])
  gen_args = (state["generator"], setup.frozen, state["fake_score"]["params"], z, cond, batch, r_dm,
              jax.numpy.asarray(1_000, jax.numpy.int32))   # past the warm-up: the step at full learning rate
  del state["generator"]
  row, gen_args = measure(jitted, gen_args, lambda a, out: (out[0],) + a[1:], **common)
  state["generator"] = gen_args[0]
  del gen_args, jitted
  emit({**base, "step": STEPS[0], **row})


def _fake_row(setup, state, x_fake, cond, r_fake, common, base, emit):
  jitted = _reporting_rss(setup.jit_fake_step({}), STEPS[1])   # no GAN: no real batch
  fake_args = (state.pop("fake_score"), setup.frozen, x_fake, cond, {}, r_fake, jax.numpy.asarray(1_000, jax.numpy.int32))
  row, fake_args = measure(jitted, fake_args, lambda a, out: (out[0],) + a[1:], **common)
  state["fake_score"] = fake_args[0]
  del fake_args, jitted
  emit({**base, "step": STEPS[1], **row})


def header(args, n_params: int) -> str:
  d = jax.devices()[0]
  return (f"device: {d.device_kind} ({jax.default_backend()}) × {jax.device_count()}, jax {jax.__version__}; "
          f"config {args.config} ({n_params:,} teacher parameters); attention {args.attention}; "
          f"batch per device {args.batch_per_device}; "
          f"median of {args.repeats} after {args.warmup} warm-up call(s); memory: XLA memory_analysis per device "
          f"in MiB (total = argument + output - alias + temp); host RSS (VmRSS) and its peak (ru_maxrss) in MiB "
          f"after the row")


COLUMNS = ("step", "activations", "remat", "batch / device", "global batch", "compile (s)", "step (s)",
           "GFLOP", "temp", "argument", "output", "alias", "generated code", "total", "host RSS", "host peak RSS")


def format_row(r: dict) -> str:
  m = r["memory"]
  mib = lambda k: f"{m[k] / MIB:,.0f}" if k in m else "n/a"
  flops = f"{r['flops'] / 1e9:,.0f}" if r.get("flops") else "n/a"
  code = f"{m['generated_code'] / MIB:.1f}" if "generated_code" in m else "n/a"
  total = bench_common.total_bytes(m)
  total = f"{total / MIB:,.0f}" if total is not None else "n/a"
  cells = (r["step"], r["dtype"], "on" if r["remat"] else "off", r["batch_per_device"], r["global_batch"],
           f"{r['compile_s']:.1f}", f"{r['median_s']:.2f}" if r["times"] else "not run", flops, mib("temp"), mib("argument"), mib("output"),
           mib("alias"), code, total, *(f"{r['host'][k] / MIB:,.0f}" if "host" in r else "n/a"
                                         for k in ("rss", "peak_rss")))
  return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="imagenet64", choices=sorted(CONFIGS))
  parser.add_argument("--batch_per_device", type=int, default=2)
  parser.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16 (model.dtype)")
  parser.add_argument("--remat", default="off", help="comma list of off, on (model.remat)")
  parser.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                      help="the attention kernel (model.attention)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (data = the remaining devices)")
  parser.add_argument("--regression_distance", default="", help="override regression.distance (lpips, l2, mse)")
  parser.add_argument("--steps", default="generator,fake_score,full",
                      help="comma list of generator, fake_score, full")
  parser.add_argument("--full_compile_only", action="store_true",
                      help="compile the full iteration (compile time, memory) without running it, e.g. where its "
                           "memory does not fit the host")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dmd_jax_bench_edm_step"),
                      help="where the random teacher (and, for :tiny, the random LPIPS) are written and kept")
  parser.add_argument("--out", default="", help="also write the table to this Markdown file")
  args = parser.parse_args(argv)
  args.steps = [x for x in args.steps.split(",") if x]
  bad = set(args.steps) - {"generator", "fake_score", "full"}
  if bad:
    raise ValueError(f"--steps entries must be generator, fake_score, full; got {sorted(bad)}")

  dtypes = [d for d in args.dtype.split(",") if d]
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      raise ValueError(f"--dtype entries must be float32 or bfloat16, got {d!r}")
  remats = []
  for r in (x for x in args.remat.split(",") if x):
    if r not in ("on", "off"):
      raise ValueError(f"--remat entries must be on or off, got {r!r}")
    remats.append(r == "on")
  os.makedirs(args.workdir, exist_ok=True)

  kwargs = IMAGENET_ADM if args.config == "imagenet64" else json.loads(
      load_config(args.config).teacher.random_init_kwargs)
  n_params = param_count(kwargs)
  if args.config == "imagenet64" and n_params != IMAGENET_ADM_PARAMS:
    raise RuntimeError(f"the ADM built here has {n_params:,} parameters, not {IMAGENET_ADM_PARAMS:,}")
  lines = [header(args, n_params), "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  print("\n".join(lines), flush=True)

  def emit(row):
    row.setdefault("host", rss())
    lines.append(format_row(row))
    print(lines[-1], flush=True)
    print(f"    times (s): {', '.join(f'{t:.2f}' for t in row['times']) or 'not run'}", file=sys.stderr,
          flush=True)
    if args.out:
      with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")

  for remat in remats:
    for dtype in dtypes:
      bench_one(args, dtype, remat, args.workdir, emit)


def param_count(init_kwargs) -> int:
  from dmd_jax.models.edm import edm_module_from_kwargs, init_inputs
  module = edm_module_from_kwargs(init_kwargs)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_inputs(module)))["params"]
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


if __name__ == "__main__":
  main()
