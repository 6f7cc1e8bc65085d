"""Teacher families, found by the config's ``model.family``: one folder each under ``dmd_jax/families/``
(docs/architecture.md, "Adding a teacher family"):

* ``teacher.py``: ``build(config, workdir)`` → ``(Teacher, frozen parameters)`` (``families/base.py``) and
  ``abstract(config)``, the same with the frozen parameters as shapes;
* ``convert.py`` (when the family reads a published checkpoint): a ``python -m dmd_jax.convert <family>``
  converter (``HELP``, ``add_arguments(parser)``, ``run(args)``);
* ``export.py``: ``write(out_dir, run, params, teacher_src)`` → the fields of ``dmd_jax_generator.json``
  (``python -m dmd_jax.export``), with ``check_teacher_src`` and ``write_lora`` where the family has them;
* ``config.py`` (when the family has a config builder): what ``configs/*.py`` build on.

The rest of the code reaches a family through this registry (the configs and the EDM-only teacher trainer
import a family's modules directly). A family's modules are imported on use, so one family's optional
dependencies never load for another.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dmd_jax.families.base import Teacher

# family name -> its package
FAMILIES = {
    "toy": "dmd_jax.families.toy",
    "edm": "dmd_jax.families.edm",
    "sd": "dmd_jax.families.sd",
    "sdxl": "dmd_jax.families.sdxl",
}


def build(config, workdir: str | None = None) -> tuple[Teacher, dict]:
  """The teacher named by ``config.model.family`` and its frozen parameters (host arrays, to hand to
  ``train.build``, which places them on the mesh; the Teacher keeps no reference to them). ``workdir`` is
  where ``:tiny`` configs write random-weight networks and text teachers cache prompt embeddings."""
  return part(_family(config), "teacher").build(config, workdir)


def abstract(config) -> tuple[Teacher, dict]:
  """The teacher of ``config`` built from its architecture alone, with abstract frozen parameters
  (``jax.ShapeDtypeStruct``): nothing is read but the networks' configs, nothing the size of a network is
  allocated and nothing is written. What compile-only memory plans use (``dmd_jax/plan.py``)."""
  return part(_family(config), "teacher").abstract(config)


def part(family: str, name: str) -> ModuleType:
  """The module ``name`` (``'teacher'``, ``'convert'``, ``'export'``, ``'config'``) of a registered family."""
  return importlib.import_module(f"{FAMILIES[family]}.{name}")


def has(family: str, name: str) -> bool:
  """Whether the family's folder holds the module ``name`` (found without importing it)."""
  return importlib.util.find_spec(f"{FAMILIES[family]}.{name}") is not None


def converters() -> dict[str, str]:
  """``{family: module}`` of the families with a converter (``python -m dmd_jax.convert <family>``)."""
  return {name: f"{package}.convert" for name, package in FAMILIES.items() if has(name, "convert")}


def exportable() -> list[str]:
  """The families whose generators ``python -m dmd_jax.export`` writes."""
  return [name for name in FAMILIES if has(name, "export")]


def exporter(family: str) -> ModuleType:
  """The export module of ``family``: ``write(out_dir, run, params, teacher_src=None) -> manifest fields``,
  and where the family has them ``check_teacher_src(teacher_src)`` and ``write_lora(out_dir, run, gen_state)``."""
  return part(family, "export")


def _family(config) -> str:
  """``config.model.family``, checked against the registry (a clear error naming the known ones otherwise)."""
  family = config.model.family
  if family not in FAMILIES:
    raise ValueError(f"model.family {family!r} is not known; expected one of: {', '.join(map(repr, FAMILIES))}")
  return family
