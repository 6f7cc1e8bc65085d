"""``python -m dmd_jax.convert <network> --src=... --dst=...``: checkpoint → converted Flax folder.

Each converter is a module exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``. A teacher
family's converter is its folder's ``convert.py``, found through the registry (``dmd_jax.families``); the
shared networks' converters (evaluation and regression networks) are registered below with one line each.
Only the module of the converter being run is imported, so one converter's optional dependencies never break
another's command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dmd_jax import families
from dmd_jax.convert.common import ConversionError

CONVERTERS = {
    **families.converters(),
    "inception": "dmd_jax.convert.inception",
    "lpips": "dmd_jax.convert.lpips",
    "clip": "dmd_jax.convert.clip",
}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="python -m dmd_jax.convert",
                                   description="Convert a pretrained checkpoint to dmd_jax Flax parameters.")
  sub = parser.add_subparsers(dest="network", required=True, metavar="<network>",
                              help=f"one of: {', '.join(CONVERTERS)}")
  chosen = argv[0] if argv and argv[0] in CONVERTERS else None
  for name, module_name in CONVERTERS.items():
    if name == chosen:
      module = importlib.import_module(module_name)
      sub_parser = sub.add_parser(name, help=getattr(module, "HELP", None), description=getattr(module, "HELP", None))
      module.add_arguments(sub_parser)
    else:
      sub.add_parser(name, help=f"convert {name} checkpoints (python -m dmd_jax.convert {name} --help)")
  args = parser.parse_args(argv)
  try:
    importlib.import_module(CONVERTERS[args.network]).run(args)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
