"""No host copy of the teacher outlives ``train.build`` (issue "Host memory"): the Teacher's functions close over
shapes only, ``Teacher.init`` copies the teacher from the frozen arrays on the mesh, and the copies are exact and
distinct buffers (donating the state leaves the frozen teacher intact)."""
import gc
import os
import sys
import types
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import config_lib, families, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import host_arrays, nbytes  # noqa: E402  (the benchmarks' walk over reachable arrays)


def _config(name: str, variant: str):
  config = config_lib.load(name, variant)
  config.regression.distance = "l2"   # no LPIPS network: only the teacher's arrays are at stake
  return config


def reachable_arrays(root) -> list:
  return host_arrays(root, device_arrays=True)


def test_walk_finds_a_closed_over_teacher():
  """The walk is not vacuous: a function closing over host parameters (the old ``teacher_copies``) reaches them."""
  params = {"w": np.ones((64, 64), np.float32), "b": [np.zeros(3, np.float32)]}

  def make(p):
    return lambda rng: jax.tree.map(jnp.array, p)
  assert nbytes(reachable_arrays(types.SimpleNamespace(init=make(params)))) == 64 * 64 * 4 + 12


def test_teacher_keeps_no_host_copy_and_init_copies_the_placed_teacher(tmp_path, monkeypatch):
  host = []   # weak references to the host teacher arrays families.build hands train.setup
  build_teacher = families.build

  def build(config, workdir):
    teacher, frozen = build_teacher(config, workdir)
    host.extend(weakref.ref(a) for a in jax.tree.leaves(frozen["teacher"]))
    return teacher, frozen
  monkeypatch.setattr(train.families, "build", build)
  run = train.setup(_config("cifar10", "tiny"), str(tmp_path))
  jax.block_until_ready(run.frozen)
  gc.collect()
  alive = [r for r in host if r() is not None]
  assert host and not alive, f"{len(alive)} of {len(host)} host teacher arrays outlive train.setup"
  teacher_leaves = jax.tree.leaves(run.frozen["teacher"])
  teacher_bytes = nbytes(teacher_leaves)
  assert teacher_bytes > 100_000 and all(isinstance(a, jax.Array) for a in teacher_leaves)

  # the Teacher (its closures) and everything of the run but the placed frozen parameters: no array the size of
  # a teacher array (the schedules' small tables aside), no host numpy array at all in the Teacher
  held = reachable_arrays([run.teacher, run.hyper, run.lora, run.cache, run.abstract_state, run.state_sharding])
  assert nbytes(held) < 0.01 * teacher_bytes, [(type(a).__name__, a.shape) for a in held]
  assert not [a for a in reachable_arrays(run.teacher) if isinstance(a, np.ndarray) and a.size > 1024]

  # the initial generator and fake score: float32 copies of the teacher on the mesh, bit for bit, in buffers of
  # their own
  state = run.init_state()
  copies = {"generator": state["generator"]["params"], "fake score": state["fake_score"]["params"]}
  for name, params in copies.items():
    leaves = jax.tree.leaves(params)
    assert jax.tree.structure(params) == jax.tree.structure(run.frozen["teacher"]), name
    for a, t in zip(leaves, teacher_leaves):
      assert a.dtype == jnp.float32 and a.sharding == t.sharding, name
      np.testing.assert_array_equal(np.asarray(a), np.asarray(t), err_msg=name)
      assert a.addressable_shards[0].data.unsafe_buffer_pointer() != \
          t.addressable_shards[0].data.unsafe_buffer_pointer(), name
  want = [np.asarray(t).copy() for t in teacher_leaves]
  bumped = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)   # the state donated
  jax.block_until_ready(bumped)
  for t, w in zip(jax.tree.leaves(run.frozen["teacher"]), want):
    assert not t.is_deleted()
    np.testing.assert_array_equal(np.asarray(t), w)
