"""Memory plans: a config's real training step compiled for a TPU slice without TPUs (or for this host's
GPUs), with XLA's per-device memory and flop counts against the chip's memory.

    python -m dmd_jax.plan --config=configs/coco.py --topology=v5litepod-32 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1 --batch_per_device=4
    python -m dmd_jax.plan --config=configs/imagenet64.py --topology=v5p-32 --batch_per_device=auto
    python -m dmd_jax.main --config=configs/cifar10.py:tiny --mode=plan --topology=v5e:2x2   # the same, as a mode

Nothing the size of a network is allocated and no weights are read: the teacher is built from its architecture
alone (``families.abstract``: parameters as ``jax.ShapeDtypeStruct``), the state, shardings and optimisers from
``train.build`` — the pure build every training run goes through — and the step is jitted exactly as
``train.py`` jits it (in / out shardings, the state donated), lowered under the mesh (``jax.set_mesh``) and
compiled (``.lower(...).compile()``). For a TPU topology the compiler is libtpu's (``pip install -e '.[tpu]'``
on any machine; JAX's default backend stays the CPU), so the figures are the TPU's own — XLA:CPU's buffer
assignment overstates a TPU's memory 4–5× (docs/benchmarks.md).

Steps (``--steps``): ``train`` (default: ``dmd.train_step``, the whole iteration as training runs it — the
generator update every N-th step, the fake-score / critic update every step), ``generator``
(``dmd.generator_update`` alone) and ``fake`` (``dmd.fake_score_update`` alone): the two halves bound the compile
time of a full-size network (the SD 1.5 generator step takes many minutes to compile on a 2-core host).

A row is a fit when argument + output − alias + temp (XLA's ``memory_analysis``) is at most the device's memory
(``HBM_GIB``; the runtime reserves a little of it, so treat a fit within a few percent as marginal). libtpu
itself refuses a program whose temporaries exceed the chip's usable HBM (v5e: 15.75 of 16 GiB); such a row
reads "no (compiler: out of memory)" with the temporaries the compiler asked for.
``--batch_per_device=auto`` searches the largest per-device DM batch whose steps all fit (doubling, then
bisection; one compile per probe). The regression batch keeps the config's ratio to the DM batch (coco.py:
2304 : 1152 → ``ceil(b / 2)``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Callable

GIB = 2.0 ** 30
MIB = 2.0 ** 20

# Memory per JAX device in GiB, from the Cloud TPU system-architecture pages: v4 32 GiB per chip (one megacore
# device per chip), v5e 16, v5p 95 (one megacore device per chip), v6e 32, TPU7x (Ironwood) 192 GiB per chip of
# two devices.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "tpu7x": 96}

# Product names (what `gcloud compute tpus` calls a slice) -> the compiler's topology names. v5e / v6e count
# chips; v4 / v5p count TensorCores (two per chip).
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
       512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_PRODUCTS = {"v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1), "v5p": ("v5p", 2), "v4": ("v4", 2)}
STEPS = ("train", "generator", "fake")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A compile target: ``name`` as the user wrote it, the compiler's topology name, the devices' memory."""
  name: str
  target: str                  # 'v5e:4x8', ... or 'local'
  hbm_bytes: float | None      # per device; None where unknown (a CPU host)
  kwargs: tuple = ()           # extra get_topology_desc arguments


def parse_topology(name: str) -> Topology:
  """A product name (``v5litepod-32``, ``v5e-8``, ``v5p-64``, ``v4-32``, ``v6e-16``), a compiler topology name
  (``v5e:4x8``, ``v5p:2x4x4``, ``v4:2x2x1``, ``v6e:4x4``, ``tpu7x:2x2x1``) or ``local`` (this host's devices, e.g.
  its GPUs). ``ValueError`` naming the accepted forms otherwise."""
  name = name.strip()
  if name == "local":
    return Topology(name, "local", None)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if m and m.group(1) in _PRODUCTS:
    chip, cores_per_chip = _PRODUCTS[m.group(1)]
    n = int(m.group(2))
    table = _2D if cores_per_chip == 1 else _3D
    chips = n // cores_per_chip
    if n % cores_per_chip or chips not in table:
      unit = "chips" if cores_per_chip == 1 else "TensorCores (2 per chip)"
      sizes = ", ".join(str(k * cores_per_chip) for k in table)
      raise ValueError(f"topology {name!r}: {m.group(1)}-N counts {unit}; N must be one of {sizes}")
    return _compiler_topology(name, f"{chip}:{table[chips]}")
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
  if m and m.group(1) in HBM_GIB:
    return _compiler_topology(name, name)
  raise ValueError(
      f"unknown topology {name!r}: use a product name (v5litepod-N / v5e-N, v6e-N: N chips; v5p-N, v4-N: N "
      f"TensorCores), a compiler topology (v5e:4x8, v5p:2x4x4, v4:2x2x1, v6e:4x4, tpu7x:2x2x1) or 'local'")


def _compiler_topology(name: str, target: str) -> Topology:
  chip, shape = target.split(":")
  dims = [int(d) for d in shape.split("x")]
  kwargs = []
  if chip == "v4":
    kwargs.append(("chip_config_name", "megacore"))   # one device per chip, as a v4 VM runs by default
  if len(dims) == 2 and math.prod(dims) < 4:           # a single-chip (or 2-chip) host
    kwargs.append(("chips_per_host_bounds", (dims[0], dims[1], 1)))
  return Topology(name, target, HBM_GIB[chip] * GIB, tuple(kwargs))


def prepare_environment(topology: Topology, env=os.environ) -> None:
  """Before JAX starts its backends: a TPU topology compiles on this host's CPU backend with libtpu loaded as
  a compile-only plugin. libtpu asks for the slice's hostnames and type (harmless warnings otherwise) and may
  query the TPU metadata server, which no request may reach from a non-TPU host: these are set unless given."""
  if topology.target == "local":
    return
  env.setdefault("JAX_PLATFORMS", "cpu")
  if "jax" in sys.modules:     # read at import: a JAX imported earlier (by a config file) must hear it too
    sys.modules["jax"].config.update("jax_platforms", env["JAX_PLATFORMS"])
  env.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # compile-only: no chip is opened, so several plans (and a training job) may load libtpu at once
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")


def devices(topology: Topology) -> list:
  """The devices to compile for: the slice's compile-only TPU devices, or this host's."""
  import jax
  if topology.target == "local":
    return jax.devices()
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(topology.target, platform="tpu", **dict(topology.kwargs))
  except Exception as e:  # noqa: BLE001  (no libtpu, or a topology it rejects)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = (" — install the TPU compiler with pip install -e '.[tpu]'"
            if "tpu" in text.lower() and ("not found" in text.lower() or "unknown backend" in text.lower()
                                          or "no module" in text.lower()) else "")
    raise ValueError(f"cannot compile for topology {topology.name!r} ({topology.target}): {text}{hint}") from e
  return list(desc.devices)


def local_hbm_bytes(devs) -> float | None:
  try:
    stats = devs[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (CPU devices have none)
    return None
  return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


# ---------------------------------------------------------------------------------------------------------
# The programs.
# ---------------------------------------------------------------------------------------------------------

def abstract_batch(run, sharding) -> dict:
  """The per-step batch ``train.batches`` feeds, as ShapeDtypeStructs: host-side text conditions, the
  regression pairs (regression weight > 0) and the GAN critic's real samples (DMD2)."""
  import jax
  import jax.numpy as jnp
  from dmd_jax.families.base import PromptConditions
  config, teacher = run.config, run.teacher
  b, rb = config.batch_size, config.regression.batch_size
  text = isinstance(teacher.conditions, PromptConditions)
  cond_row = ((tuple(teacher.conditions.prompts.table.shape[1:]), jnp.float32) if text else ((), jnp.int32))
  rows = lambda n, shape, dtype=jnp.float32: jax.ShapeDtypeStruct((n,) + tuple(shape), dtype, sharding=sharding)
  batch = {}
  if text:
    batch["cond"] = rows(b, *cond_row)
  if config.regression.weight > 0:
    batch.update(reg_z=rows(rb, teacher.sample_shape), reg_x=rows(rb, teacher.sample_shape),
                 reg_cond=rows(rb, *cond_row))
  if run.hyper.gan:
    batch.update(real_x=rows(b, teacher.sample_shape), real_cond=rows(b, *cond_row))
  return batch


def programs(run, steps) -> dict[str, tuple[Callable, tuple]]:
  """``step name -> (jitted function, abstract arguments)`` for the named steps, jitted by the ``Run`` as
  training jits its step (``Run.jit_train_step``; the halves ``jit_generator_step`` / ``jit_fake_step``)."""
  import jax
  from dmd_jax import checkpoint, sharding, streams
  hyper, teacher = run.hyper, run.teacher
  batch_sh, repl = sharding.batch_sharding(run.mesh), sharding.replicated(run.mesh)
  state = checkpoint.abstract_with_shardings(run.abstract_state, run.state_sharding)
  frozen = checkpoint.abstract_with_shardings(run.frozen, run.frozen_sharding)
  batch = abstract_batch(run, batch_sh)
  key = streams.key(run.config.seed, "train")
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
  z = jax.ShapeDtypeStruct((hyper.batch_size,) + tuple(teacher.sample_shape), jax.numpy.float32, sharding=batch_sh)
  cond = (batch["cond"] if "cond" in batch else
          jax.ShapeDtypeStruct((hyper.batch_size,), jax.numpy.int32, sharding=batch_sh))
  step = jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=repl)
  out = {}
  if "train" in steps:
    out["train"] = (run.jit_train_step(batch), (state, frozen, batch, rng))
  if "generator" in steps:
    out["generator"] = (run.jit_generator_step(batch),
                        (state["generator"], frozen, state["fake_score"]["params"], z, cond, batch, rng, step))
  if "fake" in steps:
    out["fake"] = (run.jit_fake_step(batch), (state["fake_score"], frozen, z, cond, batch, rng, step))
  return out


def memory(compiled) -> dict:
  """XLA's per-device ``memory_analysis`` in bytes and ``total`` = argument + output − alias + temp."""
  m = compiled.memory_analysis()
  keys = ("argument", "output", "alias", "temp", "generated_code")
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in keys} if m is not None else {}
  if out:
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def out_of_memory(error: Exception) -> dict:
  """The TPU compiler's refusal of a program that does not fit (``RESOURCE_EXHAUSTED: Ran out of memory on
  HBM, the total memory required for HLO temporaries (30.98G) exceeds available HBM (15.75G)``) as
  ``{'temp': required bytes, 'available': bytes}`` (what the message states); any other error is raised again."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    raise error
  out = {}
  for key, pattern in (("temp", r"required for HLO temporaries \(([\d.]+)([KMGT])"),
                       ("available", r"available HBM \(([\d.]+)([KMGT])")):
    m = re.search(pattern, text)
    if m:
      out[key] = int(float(m.group(1)) * _UNITS[m.group(2)])
  return out


def flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (a backend without it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


# ---------------------------------------------------------------------------------------------------------
# Plans.
# ---------------------------------------------------------------------------------------------------------

def regression_per_device(config, b: int) -> int:
  """The regression batch per device for DM batch ``b`` per device, at the config's ratio (at least 1)."""
  ratio = config.regression.batch_size / config.batch_size
  return max(1, math.ceil(b * ratio))


def sized_config(config, n_devices: int, b: int | None):
  """A copy of ``config`` whose global batches are ``b`` (and the regression ratio) per device; ``b=None``
  keeps the config's global batch, which must then divide over the devices."""
  c = config.copy_and_resolve_references()
  if b is None:
    for name, value in (("batch_size", c.batch_size), ("regression.batch_size", c.regression.batch_size)):
      if value % n_devices:
        raise ValueError(f"the config's {name}={value} does not divide over the {n_devices} devices of this "
                         f"topology; pass --batch_per_device=N (or auto)")
    return c
  if b < 1:
    raise ValueError(f"--batch_per_device must be >= 1, got {b}")
  c.regression.batch_size = regression_per_device(config, b) * n_devices
  c.batch_size = b * n_devices
  return c


def plan_rows(config, topology: Topology, devs, teacher, frozen, b: int | None, steps,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
  """Compiles ``steps`` of ``config`` at per-device batch ``b`` on ``devs``; one row per step."""
  import jax
  from dmd_jax import sharding, train
  c = sized_config(config, len(devs), b)
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devs)
  run = train.build(c, teacher, frozen, mesh)
  hbm = topology.hbm_bytes or (local_hbm_bytes(devs) if topology.target == "local" else None)
  rows = []
  for name, (jitted, args) in programs(run, steps).items():
    reg = f" + {c.regression.batch_size} regression" if c.regression.weight > 0 else ""
    log(f"  compiling the {name} step: {dict(mesh.shape)} mesh, global batch {c.batch_size} DM{reg} ...")
    t0 = time.perf_counter()
    try:
      with jax.set_mesh(mesh):
        compiled = jitted.lower(*args).compile()
      m, f, note = memory(compiled), flops(compiled), ""
      fits = None if hbm is None or not m else m["total"] <= hbm
    except Exception as e:  # noqa: BLE001  (the TPU compiler refuses a program that cannot fit)
      m, f, fits, note = out_of_memory(e), None, False, str(e).strip().splitlines()[0][:300]
    row = dict(step=name, topology=topology.name, target=topology.target, devices=len(devs),
               device_kind=devs[0].device_kind, data=mesh.shape["data"], fsdp=mesh.shape["fsdp"],
               batch_per_device=c.batch_size // len(devs),
               regression_per_device=c.regression.batch_size // len(devs) if c.regression.weight > 0 else 0,
               global_batch=c.batch_size, compile_s=time.perf_counter() - t0, memory=m, flops=f,
               hbm_bytes=hbm, fits=fits, note=note)
    log(f"    {format_row(row)}")
    rows.append(row)
  return rows


def search_batch(probe: Callable[[int], list[dict]], max_batch: int = 4096) -> tuple[int | None, list[dict]]:
  """The largest per-device batch ``b`` whose rows ``probe(b)`` all fit: doubling from 1, then bisection.
  Returns ``(b or None, every probed row)``."""
  rows, fits = [], {}

  def ok(b):
    if b not in fits:
      r = probe(b)
      rows.extend(r)
      fits[b] = all(x["fits"] for x in r)
    return fits[b]

  if not ok(1):
    return None, rows
  lo, hi = 1, None
  while hi is None:
    nxt = lo * 2
    if nxt > max_batch:
      return lo, rows
    if ok(nxt):
      lo = nxt
    else:
      hi = nxt
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo, rows


COLUMNS = ("step", "topology", "devices (data × fsdp)", "batch / device (DM + reg.)", "argument (MiB)",
           "output (MiB)", "alias (MiB)", "temp (MiB)", "total (GiB)", "HBM (GiB)", "fits", "TFLOP / device",
           "compile (s)")


def format_row(r: dict) -> str:
  m = r["memory"]
  mib = lambda k: f"{m[k] / MIB:,.1f}" if k in m else "n/a"
  hbm = f"{r['hbm_bytes'] / GIB:g}" if r.get("hbm_bytes") else "n/a"
  fits = {True: "yes", False: "**no**", None: "n/a"}[r["fits"]]
  if r.get("note"):    # refused by the compiler: the temporaries it needed alone
    fits += " (compiler: out of memory)"
    m = {"temp": m["temp"]} if "temp" in m else {}
  cells = (r["step"], r["topology"] + (f" ({r['target']})" if r["target"] != r["topology"] else ""),
           f"{r['devices']} ({r['data']} × {r['fsdp']})", f"{r['batch_per_device']} + {r['regression_per_device']}",
           mib("argument"), mib("output"), mib("alias"), mib("temp"),
           f"{m['total'] / GIB:.2f}" if "total" in m else "n/a", hbm, fits,
           f"{r['flops'] / 1e12:.3f}" if r.get("flops") else "n/a", f"{r['compile_s']:.1f}")
  return "| " + " | ".join(cells) + " |"


def table(rows: list[dict]) -> str:
  head = "| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS)
  return "\n".join([head] + [format_row(r) for r in rows])


def parse_steps(steps: str | Any) -> tuple[str, ...]:
  names = tuple(s.strip() for s in (steps.split(",") if isinstance(steps, str) else steps) if s.strip())
  bad = [s for s in names if s not in STEPS]
  if not names or bad:
    raise ValueError(f"--steps must name some of {', '.join(STEPS)} (comma-separated), got {steps!r}")
  return names


def run_plan(config, topology: str, batch_per_device: str = "", steps: str = "train", json_path: str = "",
             hbm_gib: float = 0.0, max_batch: int = 4096) -> dict:
  """The plan of ``config`` on ``topology`` (see the module docstring): prints the table, returns
  ``{'rows': [...], 'batch_per_device': fitting batch (auto) or None}``; with ``json_path`` also writes it.
  ``hbm_gib`` > 0 replaces the device memory a row must fit in (e.g. what another job leaves free)."""
  topo = parse_topology(topology)
  if hbm_gib < 0:
    raise ValueError(f"--hbm_gib must be > 0 (or 0: the chip's), got {hbm_gib}")
  if hbm_gib:
    topo = dataclasses.replace(topo, hbm_bytes=hbm_gib * GIB)
  prepare_environment(topo)
  names = parse_steps(steps)
  if batch_per_device not in ("", "auto"):
    try:
      int(batch_per_device)
    except ValueError:
      raise ValueError(f"--batch_per_device must be an integer or 'auto', got {batch_per_device!r}") from None
  from dmd_jax import families
  devs = devices(topo)
  t0 = time.perf_counter()
  teacher, frozen = families.abstract(config)
  print(f"plan: {config.model.family} teacher (abstract) in {time.perf_counter() - t0:.1f} s; {len(devs)} "
        f"{devs[0].device_kind} devices ({topo.target})", file=sys.stderr, flush=True)
  probe = lambda b: plan_rows(config, topo, devs, teacher, frozen, b, names)
  best = None
  if batch_per_device == "auto":
    best, rows = search_batch(probe, max_batch)
  else:
    rows = probe(int(batch_per_device) if batch_per_device else None)
  result = {"rows": rows, "batch_per_device": best}
  print(table(rows))
  if batch_per_device == "auto":
    print(f"\nlargest per-device DM batch that fits: {best if best else 'none (batch 1 does not fit)'}")
  if json_path:
    from dmd_jax import io
    io.write_json(json_path, result)
  return result


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/coco.py[:variant].",
                                           lock_config=True)
  topology = flags.DEFINE_string("topology", None, "v5litepod-32, v5p-64, v4-32, v6e-16, v5e:4x8, ..., or local")
  batch = flags.DEFINE_string("batch_per_device", "", "DM batch per device (int), 'auto' (the largest that "
                              "fits), or empty: the config's global batch over the devices")
  steps = flags.DEFINE_string("steps", "train", "comma-separated: train (the whole iteration), generator, fake")
  out = flags.DEFINE_string("json", "", "also write the rows to this JSON file")
  hbm = flags.DEFINE_float("hbm_gib", 0.0, "device memory to fit in, GiB (0: the chip's, HBM_GIB)")
  flags.mark_flags_as_required(["config", "topology"])

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
    run_plan(config.value, topology.value, batch.value, steps.value, out.value, hbm.value)

  try:
    app.run(run, argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
