"""LoRA: low-rank adapters trained on frozen teacher weights (docs/lora.md; Hu et al. 2021).

A targeted kernel ``W`` (a dense ``[in, out]`` or a convolution ``[kh, kw, in, out]``) of the network becomes
``W + (alpha / rank) · down ⊗ up`` with ``down`` shaped like ``W`` but ``rank`` output channels and ``up``
``[rank, out]`` — for a convolution, a ``kh × kw`` convolution to ``rank`` channels followed by a 1 × 1 one, as
PEFT adapts ``nn.Conv2d``. ``up`` starts at zero, so an adapted network equals its base at step 0.

The base is the teacher network's own parameters, the arrays already on the devices among the frozen ones
(``Teacher.lora.params(frozen)``): a LoRA generator holds its adapters, their optimiser state and EMA only. The
network's parameters are formed inside each jitted function (:meth:`Plan.merge`), so they exist for the
duration of one step, not between steps. Which kernels are adapted is decided by name, in the family's PyTorch
naming (``Teacher.lora.module_name``): a target matches a module whose dotted name equals it or ends with
``.target`` (PEFT's rule), e.g. ``to_q`` or ``downsamplers.0.conv``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DOWN, UP = "lora_down", "lora_up"


@dataclasses.dataclass(frozen=True)
class Base:
  """What a teacher family offers LoRA (``Teacher.lora``; ``None`` where the generator is not a copy of the
  teacher network). ``params(frozen)`` → the teacher network's parameters among the frozen ones (the structure
  of the generator's and the fake score's); ``module_name(path)`` → the dotted PyTorch name of the module that
  owns the kernel at Flax ``path`` (a tuple of keys ending in ``'kernel'``); ``default_targets``: the family's
  equivalents of the official DMD2 SDXL LoRA targets."""
  params: Callable[[dict], Any]
  module_name: Callable[[tuple], str]
  default_targets: tuple


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def matches(name: str, targets: Sequence[str]) -> bool:
  """PEFT's rule: ``name`` is a target, or ends with ``'.' + target``."""
  return any(name == t or name.endswith("." + t) for t in targets)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The adapters of one network: the module paths (Flax keys, without ``'kernel'``) they adapt with those
  kernels' shapes, the rank and ``alpha`` (scale ``alpha / rank``)."""
  modules: tuple          # ((path tuple, kernel shape), ...) in the base's flattening order
  rank: int
  alpha: float
  targets: tuple

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def num_params(self) -> int:
    """Adapter parameters: ``rank · (fan_in + out)`` per adapted kernel (fan_in = kh·kw·in for a convolution)."""
    return sum(self.rank * (int(np.prod(shape[:-1])) + shape[-1]) for _, shape in self.modules)

  def init(self, rng) -> dict:
    """Adapters as a nested dict mirroring the base's module paths, ``{DOWN, UP}`` at each: ``down`` uniform in
    ±1/sqrt(fan_in) (PEFT's default for LoRA A), ``up`` zeros (the adapted network starts as its base)."""
    out: dict = {}
    for i, (path, shape) in enumerate(self.modules):
      fan_in = int(np.prod(shape[:-1]))
      bound = 1.0 / np.sqrt(fan_in)
      node = out
      for k in path:
        node = node.setdefault(k, {})
      node[DOWN] = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:-1], self.rank), jnp.float32,
                                      -bound, bound)
      node[UP] = jnp.zeros((self.rank, shape[-1]), jnp.float32)
    return out

  def delta(self, adapter) -> jax.Array:
    """``scale · down ⊗ up``: the change of one kernel (its shape)."""
    return self.scale * jnp.tensordot(adapter[DOWN], adapter[UP], axes=1)

  def merge(self, base, adapters):
    """The adapted network's parameters: every adapted kernel ``W + delta``, every other leaf the base's own
    array. Differentiable in ``adapters``; call it inside the jitted function that uses the result."""
    by_module = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
      names = _names(path)
      by_module.setdefault(names[:-1], {})[names[-1]] = leaf

    def one(path, w):
      names = _names(path)
      a = by_module.get(names[:-1]) if names[-1] == "kernel" else None
      return w if a is None else w + self.delta(a).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(one, base)

  def spec(self) -> dict:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
            "num_modules": len(self.modules), "num_params": self.num_params()}


def plan(base_shapes, base: Base | None, rank: int, alpha: float, targets: Sequence[str] = (),
         what: str = "model.lora") -> Plan:
  """The adapters for ``base_shapes`` (the network's parameters, or their ``ShapeDtypeStruct``s): every dense
  or convolution kernel whose module name matches ``targets`` (empty: ``base.default_targets``). Clear errors
  for a family without LoRA, a bad rank, or targets that match nothing."""
  if base is None:
    raise ValueError(f"{what}.rank > 0, but this teacher family's generator is not a copy of the teacher network "
                     "(LoRA applies to the edm and sd families)")
  if int(rank) < 1 or float(alpha) <= 0:
    raise ValueError(f"{what}: rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
  targets = tuple(targets) or tuple(base.default_targets)
  modules, seen = [], set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(base_shapes)[0]:
    names = _names(path)
    if names[-1] != "kernel" or len(leaf.shape) not in (2, 4):
      continue
    name = base.module_name(names)
    hit = [t for t in targets if matches(name, [t])]
    if hit:
      modules.append((names[:-1], tuple(int(s) for s in leaf.shape)))
      seen.update(hit)
  unused = [t for t in targets if t not in seen]
  if unused:
    raise ValueError(f"{what}.targets {unused} match no dense or convolution kernel of the network "
                     f"(names are the family's PyTorch module names, e.g. 'to_q', 'downsamplers.0.conv')")
  return Plan(tuple(modules), int(rank), float(alpha), targets)


def fingerprint(params) -> dict:
  """What identifies a base network in a LoRA checkpoint: its parameter count, the shapes' hash and float64
  sums of its values and their squares, computed on the host (compared with a relative tolerance)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = json.dumps([["/".join(_names(p)), list(np.shape(v))] for p, v in leaves])
  total = sq = 0.0
  for _, v in leaves:
    a = np.asarray(jax.device_get(v), np.float64)
    total += float(a.sum())
    sq += float((a * a).sum())
  return {"num_params": int(sum(np.size(v) for _, v in leaves)),
          "shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest()[:16], "sum": total, "sum_sq": sq}


def check_fingerprint(stored: dict | None, current: dict, where: str) -> None:
  """A clear error when the checkpoint's adapters were trained on another base network."""
  if not stored:
    raise ValueError(f"{where} holds no teacher fingerprint: it was not written by a LoRA run of this config")
  same = (stored.get("num_params") == current["num_params"]
          and stored.get("shapes_sha256") == current["shapes_sha256"]
          and all(abs(stored.get(k, np.inf) - current[k]) <= 1e-6 * max(abs(current[k]), 1.0)
                  for k in ("sum", "sum_sq")))
  if not same:
    raise ValueError(f"{where} holds LoRA adapters of another teacher (stored fingerprint {stored}, this teacher "
                     f"{current}): point teacher.path at the teacher the run was trained on, or use a new workdir")
