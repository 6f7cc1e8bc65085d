"""``python -m dmd_jax.export``: a distilled generator, out of its Orbax checkpoint, in its teacher's format.

    python -m dmd_jax.export --config=CONFIG --workdir=WORKDIR --dst=DIR [--step=N] [--overwrite]
        [--teacher_src=DIR]

``--config`` (and ``--config.a.b=value`` overrides) as for ``python -m dmd_jax.main``: the run's config. The
checkpoint of ``--step`` (default: the latest) in ``WORKDIR`` is restored and its generator (the EMA when the
run keeps one) written to ``DIR`` in the format of the teacher family (``config.model.family``), by the
family's ``export.py`` (``dmd_jax/families/<family>/export.py``):

* ``sd``: a diffusers ``unet/`` folder; with ``--teacher_src`` (the teacher's original diffusers pipeline
  folder) a whole ``StableDiffusionPipeline`` folder; a LoRA run's adapters alone in ``lora/``.
* ``edm``: ``generator.safetensors`` (EDMPrecond's state dict, EDM's names) + ``init_kwargs.json``, the two
  inputs of ``python -m dmd_jax.convert edm``.
* ``toy``: ``generator.npz`` (the flattened Flax parameters).

Every export also holds ``dmd_jax_generator.json``: how to call the network (timesteps or sigmas, the
parameterisation, shapes), the source run and step. docs/export.md describes each field.

The export is atomic (``export_lib.staged_folder``): everything is written into a temporary sibling folder,
which replaces ``DIR`` once complete; a non-empty ``DIR`` is refused unless ``--overwrite``. A failed or killed
export leaves ``DIR`` as it was. Destinations are local folders (copy the result to a bucket afterwards); the
workdir may be local or ``gs://``.

Bad input (a non-empty ``DIR``, no checkpoint, an unknown step, ...) is one ``error:`` line on stderr and exit
status 2, as in ``dmd_jax.main``.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from typing import Any, Callable, Mapping

from absl import app, flags
from ml_collections import config_flags

from dmd_jax import export_lib, families, io, modes, train
from dmd_jax.writers import quiet_library_logs


def _writer(family: str) -> Callable[..., dict]:
  def write(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
    return families.exporter(family).write(out_dir, run, params, teacher_src=teacher_src)
  return write


# family -> its writer: (out_dir, run, float32 params, teacher_src) -> its fields of dmd_jax_generator.json
WRITERS: dict[str, Callable[..., dict]] = {family: _writer(family) for family in families.exportable()}


def export(config, workdir: str, dst: str, step: int | None = None, overwrite: bool = False,
           teacher_src: str | None = None, config_name: str | None = None,
           config_overrides: Mapping[str, Any] | None = None) -> dict:
  """Writes the generator of checkpoint ``step`` (default: the latest) of the run ``(config, workdir)`` to
  the local folder ``dst`` in its teacher family's format (module docstring); returns the manifest
  (``dmd_jax_generator.json``). ``config_name`` / ``config_overrides``: how the config was given, recorded
  in the manifest. Bad input is a ``ValueError`` / ``FileNotFoundError`` raised before anything is written."""
  family = config.model.family
  if family not in WRITERS:
    raise ValueError(f"model.family={family!r} cannot be exported; expected one of {', '.join(WRITERS)}")
  exporter = families.exporter(family)
  if not workdir:
    raise ValueError("--workdir is required (the run's folder)")
  if teacher_src is not None:
    if not hasattr(exporter, "check_teacher_src"):
      raise ValueError(f"--teacher_src is for Stable Diffusion runs (model.family='sd'), not {family!r}")
    exporter.check_teacher_src(teacher_src)
  dst = export_lib.check_destination(dst, overwrite, {"--workdir": workdir, "--teacher_src": teacher_src})
  if not io.is_remote(workdir) and not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such folder")
  step = export_lib.choose_step(workdir, step)

  run = train.setup(config, workdir)
  gen_state, _ = modes.latest_generator(run, step)
  which = export_lib.params_source(gen_state)
  params = export_lib.generator_network_params(run, gen_state)
  print(f"read the generator ({which}, {export_lib.num_params(params):,} parameters) of step {step} from "
        f"{io.join(run.workdir, 'checkpoints', str(step))}", flush=True)
  manifest = {"format": export_lib.FORMAT, "format_version": export_lib.FORMAT_VERSION, "family": family}
  with export_lib.staged_folder(dst) as tmp:
    manifest.update(WRITERS[family](tmp, run, params, teacher_src=teacher_src))
    if "generator" in run.lora:   # the exported network is the merged one; a family may add the adapters alone
      manifest["lora"] = (exporter.write_lora(tmp, run, gen_state) if hasattr(exporter, "write_lora") else
                          {"rank": run.lora["generator"].rank, "note": "adapters merged into the exported weights"})
    manifest["source"] = {
        "workdir": run.workdir, "step": int(step), "parameters": which,
        "config": config_name, "config_overrides": export_lib.jsonable(dict(config_overrides or {})),
        "teacher_src": (os.path.abspath(teacher_src) if teacher_src else None),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_config": json.loads(config.to_json_best_effort()),
    }
    path = os.path.join(tmp, export_lib.MANIFEST)
    export_lib.write_json(path, manifest)   # last: its presence marks a complete export
    export_lib.wrote(path, tmp)
    total = export_lib.size(tmp)
  print(f"exported step {step} of {run.workdir} ({family}) to {dst} ({export_lib.human(total)})", flush=True)
  return manifest


# ---------------------------------------------------------------------------------------------------------
# Command line (the conventions of dmd_jax.main).
# ---------------------------------------------------------------------------------------------------------

def _define_flags() -> dict:
  """The command line's flags, defined only when it runs (importing this module leaves absl's global flags
  alone: ``dmd_jax.main`` defines ``--config`` and ``--workdir`` too)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. "
                                                "configs/coco.py:tiny.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "The run's folder (its checkpoints/)."),
      "dst": flags.DEFINE_string("dst", None, "The export folder (local; empty or missing unless --overwrite)."),
      "step": flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest)."),
      "overwrite": flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst (once the new export is "
                                     "complete)."),
      "teacher_src": flags.DEFINE_string("teacher_src", None, "Stable Diffusion: the teacher's original diffusers "
                                         "pipeline folder; its other parts are copied so that --dst is a whole "
                                         "pipeline."),
  }


def main(argv, f: Mapping[str, Any]):
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "dst"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  flag = flags.FLAGS["config"]
  export(f["config"].value, f["workdir"].value, f["dst"].value, step=f["step"].value,
         overwrite=f["overwrite"].value, teacher_src=f["teacher_src"].value,
         config_name=config_flags.get_config_filename(flag),
         config_overrides=config_flags.get_override_values(flag))


def _exit(code: int, message: str | None = None, trace: bool = False) -> None:
  if trace:
    traceback.print_exc()
  if message:
    print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run():
  defined = _define_flags()
  flags.mark_flag_as_required("config")
  try:
    app.run(lambda argv: main(argv, defined))
  except (ValueError, FileNotFoundError) as e:   # bad input: one clear line, no traceback
    _exit(2, str(e))
  except KeyboardInterrupt:
    _exit(130, "interrupted (SIGINT)")


if __name__ == "__main__":
  run()
