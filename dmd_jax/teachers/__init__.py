"""Teacher families, found by the config's ``model.family``: each module's ``build(config, workdir)`` returns
``(Teacher, frozen parameters)`` (``teachers/base.py``). To add a family, write a module with ``build`` and
register it here (docs/architecture.md)."""
from __future__ import annotations

import importlib

from dmd_jax.teachers.base import Teacher

# family name -> module (imported on use, so one family's optional dependencies never load for another)
FAMILIES = {
    "toy": "dmd_jax.teachers.toy",
    "edm": "dmd_jax.teachers.edm",
    "sd": "dmd_jax.teachers.sd",
}


def build(config, workdir: str | None = None) -> tuple[Teacher, dict]:
  """The teacher named by ``config.model.family`` and its frozen parameters (host arrays, to hand to
  ``train.build``, which places them on the mesh; the Teacher keeps no reference to them). ``workdir`` is
  where ``:tiny`` configs write random-weight networks and text teachers cache prompt embeddings."""
  return _family(config).build(config, workdir)


def abstract(config) -> tuple[Teacher, dict]:
  """The teacher of ``config`` built from its architecture alone, with abstract frozen parameters
  (``jax.ShapeDtypeStruct``): nothing is read but the networks' configs, nothing the size of a network is
  allocated and nothing is written. What compile-only memory plans use (``dmd_jax/plan.py``)."""
  return _family(config).abstract(config)


def _family(config):
  """The module of ``config.model.family`` (a clear error naming the known ones otherwise)."""
  family = config.model.family
  if family not in FAMILIES:
    raise ValueError(f"model.family {family!r} is not known; expected one of: {', '.join(map(repr, FAMILIES))}")
  return importlib.import_module(FAMILIES[family])
