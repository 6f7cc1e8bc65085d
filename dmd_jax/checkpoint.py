"""Orbax checkpoints under ``<workdir>/checkpoints/<step>``: the train state (generator and fake score with
their optimizer states, the step) plus a JSON item with the config and metadata. The frozen teacher is not
saved: the config names its converted weights.

A run killed mid-save keeps the previous good checkpoint, and ``latest_step`` never returns a half-written
one: on a local disk Orbax writes each step to a temporary folder and renames it when complete; on ``gs://``
(no folder renames) it writes ``<step>/`` in place and marks it complete with a ``commit_success.txt``
written last, and a step without one is ignored, then overwritten by the next save of that step. Orbax
does its own I/O — array data through TensorStore's gcs driver, the rest through ``etils.epath`` — so
``workdir`` may be local or ``gs://`` (docs/gcs.md; as everywhere, ``dmd_jax.io``).
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from dmd_jax import io


class Checkpointer:
  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = io.path(io.join(io.abspath(workdir), "checkpoints"))
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             read_only=read_only))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, ascending."""
    return sorted(int(s) for s in self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save; call ``wait`` before exiting."""
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores straight into the shardings of ``abstract_state`` (a pytree of ShapeDtypeStructs)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
