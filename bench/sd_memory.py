"""Per-device XLA memory of the full-size Stable Diffusion v1.5 DMD steps on meshes of 1 to N devices:
which slice fits which batch. Compile only: nothing the size of a network is ever allocated.

    python bench/sd_memory.py                                               # meshes 1 8 32, batch 1 4 8, FSDP
    python bench/sd_memory.py --meshes 8 --layouts data                     # pure data parallelism, 8 devices
    python bench/sd_memory.py --tiny --meshes 1 2 --batch_per_device 1 2    # the :tiny shapes (seconds)
    python bench/sd_memory.py --meshes 1 --batch_per_device 1 --lora 0 64   # full fine-tune vs LoRA rank 64

For each mesh size N, layout, per-device DM batch b and step, one program is jitted as ``train.py`` jits its step
and compiled (``lower(abstract args).compile()``) for an emulated mesh of N CPU devices
(``--xla_force_host_platform_device_count``, set here unless XLA_FLAGS already sets it; ``JAX_PLATFORMS=cpu``
unless set): ``dmd.generator_update`` (generator forward / backward on the DM batch and the regression batch,
the guided teacher and the fake score at the noised samples, LPIPS between VAE-decoded 512 px images, AdamW)
and ``dmd.fake_score_update`` (fake-score forward / backward on detached samples, AdamW), with the state donated.
A row gives XLA's ``compiled.memory_analysis()`` per device (temp, argument, output, alias, generated code;
total = argument + output - alias + temp), XLA's flop count per device and the compile time.

The config is ``configs/coco.py`` (``families.sd.config.sd_config``: bfloat16 activations, rematerialised UNet blocks,
guidance 3, LPIPS regression weight 0.25 on VAE-decoded images, ``train.make_hyper``'s AdamW), with the global DM
batch b × N and the regression batch ceil(b / 2) × N (the recipe's 2304 : 1152). The networks come from
``families.sd.teacher.sd_teacher`` on the released SD 1.5 configs (``families.sd.convert.SD15_UNET`` / ``SD15_VAE`` /
``SD15_TEXT``): parameters, Adam moments, the frozen teacher / VAE / LPIPS VGG16 and the inputs are
``jax.ShapeDtypeStruct``\\ s with shardings, the state's shapes and shardings from ``train.build`` (the pure
build every training run goes through). Text
conditions are abstract [B, 77, 768] CLIP embeddings (no prompt is embedded).

Layouts (``sharding.make_mesh(data, fsdp)``; batches are split over both axes, i.e. over all N devices):
``fsdp`` = data 1 × fsdp N (every array of >= ``mesh.min_shard_size`` elements split over the N devices),
``data`` = data N × fsdp 1 (weights and optimizer state replicated). On one device the two are the same program
(``data`` rows are skipped there).

XLA:CPU's buffer assignment stands in for an accelerator's: fusion, layouts and bfloat16 handling differ on
TPU / GPU (XLA:CPU may keep bfloat16 intermediates in float32), so read the numbers as estimates; on an
accelerator host, ``JAX_PLATFORMS=tpu python bench/sd_memory.py --meshes 8`` compiles for the real devices.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS = {"generator": "generator step", "fake": "fake-score step"}
LAYOUTS = ("fsdp", "data")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--meshes", type=int, nargs="+", default=[1, 8, 32], help="numbers of devices")
  parser.add_argument("--batch_per_device", type=int, nargs="+", default=[1, 4, 8],
                      help="DM batch per device (regression batch per device: half of it, rounded up)")
  parser.add_argument("--steps", nargs="+", default=["generator", "fake"], choices=sorted(STEPS))
  parser.add_argument("--layouts", nargs="+", default=["fsdp"], choices=LAYOUTS)
  parser.add_argument("--tiny", action="store_true",
                      help="the tiny random SD shapes of configs/coco.py:tiny (families.sd.convert.TINY_*), same code path")
  parser.add_argument("--min_shard_size", type=int, default=0,
                      help="mesh.min_shard_size: arrays with fewer elements stay replicated (0: the config's, 2^18)")
  parser.add_argument("--fast_compile", action="store_true",
                      help=f"XLA:CPU without LLVM's optimisations ({FAST_COMPILE}): faster compiles, the same "
                           f"buffer assignment (memory_analysis)")
  parser.add_argument("--lora", type=int, nargs="+", default=[0],
                      help="model.lora.rank of the rows (0: the full fine-tune; > 0: the generator trains LoRA "
                           "adapters on the teacher's arrays, docs/lora.md)")
  parser.add_argument("--lora_fake", action="store_true", help="LoRA runs: the fake score trains adapters too")
  parser.add_argument("--json", default="", help="also write the rows (bytes) to this JSON file, after every row")
  args = parser.parse_args(argv)
  if min(args.lora) < 0:
    raise SystemExit(f"--lora ranks must be >= 0, got {args.lora}")
  for name in ("meshes", "batch_per_device"):
    if min(getattr(args, name)) < 1:
      raise SystemExit(f"--{name} entries must be >= 1, got {getattr(args, name)}")
  return args


def _set_xla_flags(n: int, fast_compile: bool) -> None:
  """Before jax is imported: N emulated CPU devices unless the environment says otherwise."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags += f" --xla_force_host_platform_device_count={n}"
  if fast_compile:
    flags += " " + FAST_COMPILE
  os.environ["XLA_FLAGS"] = flags.strip()


class Model:
  """The abstract SD networks of one config (``families.sd.teacher.abstract``: the teacher from the networks' configs,
  frozen parameters as shapes): configs, abstract frozen parameters, parameter counts."""

  def __init__(self, tiny: bool):
    from dmd_jax import config_lib
    from dmd_jax.families.sd import teacher as sd
    self.tiny = tiny
    self.config = config_lib.load("coco", "tiny" if tiny else "")
    self.teacher, self.frozen = sd.abstract(self.config)
    cfgs = sd.network_configs(self.config)
    self.unet_cfg, self.vae_cfg = cfgs["unet"], cfgs["vae"]
    self.counts = {name: _count(tree) for name, tree in
                   (("UNet", self.frozen["teacher"]["unet"]), ("VAE", self.frozen["vae"]),
                    ("LPIPS VGG16", self.frozen["lpips"]))}

def _count(tree) -> int:
  import jax
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def compile_rows(model: Model, n: int, layout: str, b: int, steps, emit, lora_rank: int = 0,
                 lora_fake: bool = False) -> None:
  """The rows of one mesh (N devices, ``layout``) and per-device batch ``b``: the config and mesh, then
  ``train.build`` (hyper-parameters, abstract state, shardings) as a training run does, then compiles each
  step. ``lora_rank`` > 0: the generator (with ``lora_fake`` also the fake score) trains LoRA adapters."""
  import jax
  from bench import common
  from dmd_jax import plan, sharding, train

  config = model.config.copy_and_resolve_references()
  rb = -(-b // 2)
  config.batch_size, config.regression.batch_size = b * n, rb * n
  config.mesh.data, config.mesh.fsdp = (1, n) if layout == "fsdp" else (n, 1)
  config.model.lora.rank, config.model.lora.fake_score = lora_rank, lora_fake
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=jax.devices()[:n])
  run = train.build(config, model.teacher, model.frozen, mesh)
  state_sh = run.state_sharding
  B, RB = config.batch_size, config.regression.batch_size
  base = dict(layout=layout, devices=n, data=config.mesh.data, fsdp=config.mesh.fsdp, batch_per_device=b,
              regression_per_device=rb, global_batch=B, global_regression_batch=RB)
  n_sharded = sum("fsdp" in s.spec for s in jax.tree.leaves(state_sh))
  print(f"[{layout} {config.mesh.data}x{config.mesh.fsdp}, b={b}] abstract state and shardings in "
        f"{time.perf_counter() - t0:.1f} s ({n_sharded} of {len(jax.tree.leaves(state_sh))} state arrays "
        f"FSDP-sharded)", file=sys.stderr, flush=True)

  # the steps jitted as train.py jits its step, on abstract arguments (dmd_jax/plan.py)
  programs = plan.programs(run, ["fake" if step == "fake" else "generator" for step in steps])
  for step in steps:
    print(f"  compiling the {STEPS[step]} ...", file=sys.stderr, flush=True)
    jitted, args = programs[step]
    with jax.set_mesh(mesh):
      row, _ = common.measure(jitted, args, None, warmup=0, repeats=0, run=False)
    lora = lora_rank and (step == "generator" or lora_fake)
    emit({**base, "step": STEPS[step] + (f" (LoRA r{lora_rank})" if lora else ""), "lora_rank": lora_rank,
          "trainable_params": _count(run.abstract_state["generator" if step == "generator" else
                                                        "fake_score"]["params"]),
          "compile_s": row["compile_s"], "memory": row["memory"], "flops": row["flops"]})


COLUMNS = ("step", "layout (data × fsdp)", "batch / device (DM + reg.)", "global batch (DM + reg.)",
           "compile (s)", "GFLOP / device", "temp", "argument", "output", "alias", "generated code", "total (MiB)",
           "total (GiB)")


def format_row(r: dict) -> str:
  from bench.common import GIB, MIB, total_bytes
  m = r["memory"]
  mib = lambda k, fmt=",.0f": format(m[k] / MIB, fmt) if k in m else "n/a"
  total = total_bytes(m)
  cells = (r["step"], f"{r['layout']} ({r['data']} × {r['fsdp']})",
           f"{r['batch_per_device']} + {r['regression_per_device']}",
           f"{r['global_batch']} + {r['global_regression_batch']}", f"{r['compile_s']:.1f}",
           f"{r['flops'] / 1e9:,.0f}" if r.get("flops") else "n/a",
           mib("temp"), mib("argument"), mib("output"), mib("alias"), mib("generated_code", ".1f"),
           f"{total / MIB:,.0f}" if total is not None else "n/a",
           f"{total / GIB:.2f}" if total is not None else "n/a")
  return "| " + " | ".join(str(c) for c in cells) + " |"


def header(model: Model) -> str:
  import jax
  c = model.config
  d = jax.devices()[0]
  counts = ", ".join(f"{k} {v:,}" for k, v in model.counts.items())
  what = "configs/coco.py:tiny shapes (families.sd.convert.TINY_*)" if model.tiny else "Stable Diffusion v1.5 (configs/coco.py)"
  return (f"{what}: parameters {counts}; activations {c.model.dtype}, remat {c.model.remat}, guidance "
          f"{c.guidance_scale}, regression {c.regression.distance} (weight {c.regression.weight}) on VAE-decoded "
          f"{model.teacher.sample_shape[0] * 2 ** (len(model.vae_cfg['block_out_channels']) - 1)} px images; "
          f"regression batch per device = ceil(DM batch / 2) (the recipe's 2304 : 1152); FSDP-shards arrays of >= "
          f"{c.mesh.min_shard_size:,} elements. Compile only on {d.platform} ({jax.device_count()} devices; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), jax {jax.__version__}; memory: XLA memory_analysis per "
          f"device in MiB (total = argument + output - alias + temp).")


def main(argv=None):
  args = parse_args(argv)
  _set_xla_flags(max(args.meshes), args.fast_compile)
  import jax
  if max(args.meshes) > jax.device_count():
    raise SystemExit(f"--meshes up to {max(args.meshes)} need that many devices; jax has {jax.device_count()} "
                     f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
  t0 = time.perf_counter()
  model = Model(args.tiny)
  if args.min_shard_size:
    model.config.mesh.min_shard_size = args.min_shard_size
  print(f"abstract networks in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  print(header(model) + "\n", flush=True)
  print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS), flush=True)
  rows = []

  def emit(row):
    rows.append(row)
    print(format_row(row), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"header": header(model), "rows": rows}, f, indent=1)

  for n in args.meshes:
    for layout in args.layouts:
      if layout == "data" and n == 1 and "fsdp" in args.layouts:
        print("[data 1x1] the same program as fsdp 1x1: skipped", file=sys.stderr, flush=True)
        continue
      for b in args.batch_per_device:
        for rank in args.lora:
          compile_rows(model, n, layout, b, args.steps, emit, rank, args.lora_fake)


if __name__ == "__main__":
  main()
