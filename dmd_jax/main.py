"""Entry point: ``python -m dmd_jax.main --config=configs/toy2d.py --workdir=DIR [--mode=...]``.

Modes: ``train`` (default; resumes from the latest checkpoint in the workdir), ``plan`` (the train step compiled
for ``--topology``, its per-device memory: ``dmd_jax/plan.py``), ``sample`` (one-step samples
of the latest checkpoint to an .npz; for text-to-image configs ``--prompt="..."`` and a .png grid), ``teacher_sample`` (the teacher's ODE samples, same format), ``eval`` (the config's metrics on the latest checkpoint), ``pairs``
(build the regression set). Config fields are overridden with ``--config.a.b=value``; unknown keys are
errors.
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/toy2d.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, samples, pairs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "teacher_sample", "eval", "pairs",
                                            "teacher_train", "plan"],
                          "What to do (teacher_train: train an EDM teacher from scratch, configs/digits.py; "
                          "plan: compile the train step for --topology and print its memory, dmd_jax/plan.py).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "--mode=sample / teacher_sample: how many samples.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=sample / teacher_sample: the output .npz file; "
                              "--mode=plan: also write the rows to this JSON file.")
_SEED = flags.DEFINE_integer("seed", 0, "--mode=sample / teacher_sample: the sampling seed.")
_AT_INIT = flags.DEFINE_bool("at_init", False, "--mode=eval: evaluate the untrained generator (step 0: for EDM "
                              "and SD teachers, the teacher's own one-step sample) instead of the latest checkpoint.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=plan: v5litepod-32, v5p-64, v4-32, v6e-16, v5e:4x8, "
                                "..., or local (this host's GPUs)")
_BATCH_PER_DEVICE = flags.DEFINE_string("batch_per_device", "", "--mode=plan: DM batch per device, 'auto' (the "
                                        "largest that fits), or empty (the config's global batch)")
_STEPS = flags.DEFINE_string("steps", "train", "--mode=plan: comma-separated train, generator, fake")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "--mode=plan: device memory to fit in, GiB (0: the chip's)")
_PROMPT = flags.DEFINE_string("prompt", None, "--mode=sample, text-to-image configs: the prompt (the output "
                              "is then a .png grid of --num_samples one-step images).")


def main(argv):
  from dmd_jax.writers import quiet_library_logs
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from dmd_jax import distributed, modes, preemption, train  # imported here so that --help stays fast
  preemption.install()   # SIGTERM / SIGINT handling (dmd_jax/preemption.py); again after jax.distributed starts

  config = _CONFIG.value
  workdir = _WORKDIR.value
  mode = _MODE.value
  if mode == "plan":   # compile only: no workdir, nothing written but --output (JSON)
    if not _TOPOLOGY.value:
      raise app.UsageError("--mode=plan needs --topology (e.g. v5litepod-32, v5p-64, local)")
    from dmd_jax import plan
    plan.run_plan(config, _TOPOLOGY.value, _BATCH_PER_DEVICE.value, _STEPS.value, _OUTPUT.value or "",
                  _HBM_GIB.value)
    return
  if workdir is None:
    raise app.UsageError("--workdir is required")
  if mode in ("sample", "teacher_sample") and not _OUTPUT.value:
    raise app.UsageError(f"--mode={mode} needs --output=FILE.npz (FILE.png with --prompt)")
  if mode in ("train", "teacher_train"):
    if mode == "teacher_train":
      from dmd_jax import teacher_train
    try:
      (train.train if mode == "train" else teacher_train.train)(config, workdir)
    except preemption.Preempted as e:   # SIGTERM: checkpoint saved; launchers restart on this exit code
      print(str(e), file=sys.stderr)
      sys.exit(distributed.PREEMPTED_EXIT_CODE)
  elif mode == "sample":
    modes.sample(config, workdir, _NUM_SAMPLES.value, _OUTPUT.value, _SEED.value, prompt=_PROMPT.value)
  elif mode == "teacher_sample":
    modes.sample_teacher(config, workdir, _NUM_SAMPLES.value, _OUTPUT.value, _SEED.value)
  elif mode == "eval":
    modes.evaluate(config, workdir, at_init=_AT_INIT.value)
  elif mode == "pairs":
    modes.pairs(config, workdir)


def _exit(code: int, message: str | None = None, trace: bool = False) -> None:
  """Exits with ``code`` after an error. In a multi-process job without the atexit handlers: JAX's
  ``jax.distributed`` shutdown waits at a barrier for every peer, and a stuck peer never comes."""
  if trace:
    traceback.print_exc()
  if message:
    logging.error("%s", message)
    print(f"error: {message}", file=sys.stderr)
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def run():
  flags.mark_flag_as_required("config")
  try:
    app.run(main)
  except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
    _exit(2, str(e))
  except KeyboardInterrupt:                     # a first SIGINT (a second one exits at once: preemption.py)
    _exit(130, "interrupted (SIGINT)", trace=True)
  except Exception as e:                        # pylint: disable=broad-except
    from dmd_jax import distributed
    _exit(1, distributed.explain_failure(e), trace=True)


if __name__ == "__main__":
  run()
