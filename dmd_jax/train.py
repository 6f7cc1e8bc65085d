"""The trainer: build (config → teacher, mesh, shardings, abstract state), then the loop — restore or init,
compile once, step, periodic actions (logging, evaluators, checkpoints), SIGTERM. What the step computes is
``dmd.train_step``; what the evaluators measure is ``evaluation/evaluators.py``; the other modes are
``modes.py`` (docs/architecture.md)."""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time
from typing import Any

import jax
from absl import logging

from dmd_jax import checkpoint, dmd, io, sharding, streams, teachers, writers
from dmd_jax.data.pairs import EpochSampler, PairRows, PairStore, build_pairs
from dmd_jax.preemption import Preempted, Preemption
from dmd_jax.teachers.base import Teacher


# ---------------------------------------------------------------------------------------------------------
# Build: everything a mode needs, from the config.
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """One run's teacher, mesh, frozen parameters (on device), optimisers, shardings and abstract state."""
  config: Any
  workdir: str | None
  mesh: Any
  teacher: Teacher
  frozen: dict
  frozen_sharding: dict
  hyper: dmd.DMDHyper
  abstract_state: Any
  state_sharding: Any
  cache: dict = dataclasses.field(default_factory=dict)   # compiled helpers and loaded eval networks

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def _init(self, key):
    return dmd.init_state(self.teacher, self.hyper, *self.teacher.init(key))

  def init_state(self):
    key = streams.key(self.config.seed, "init")
    return jax.jit(self._init, out_shardings=self.state_sharding)(key)

  def restore(self, ckpt: checkpoint.Checkpointer, step: int):
    abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_sharding)
    return ckpt.restore(step, abstract)


def make_hyper(config, mesh) -> dmd.DMDHyper:
  """The static hyper-parameters of one DMD iteration (docs/method.md §6)."""
  o = config.optim
  n = config.dmd.fake_updates_per_generator_update
  if n < 1:
    raise ValueError(f"dmd.fake_updates_per_generator_update must be >= 1, got {n}")
  make = functools.partial(dmd.make_optimizer, warmup_steps=o.warmup_steps, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, clip_norm=o.clip_norm, decay=o.decay)
  batch = sharding.batch_sharding(mesh)
  n_dev = mesh.devices.size
  for name, b in (("batch_size", config.batch_size), ("regression.batch_size", config.regression.batch_size)):
    if b % n_dev:
      raise ValueError(f"{name}={b} must be divisible by the number of devices ({n_dev})")
  return dmd.DMDHyper(
      batch_size=config.batch_size,
      generator_optimizer=make(o.lr, total_steps=config.num_train_steps // n),
      fake_score_optimizer=make(o.lr, total_steps=config.num_train_steps),
      dm_weight=config.dmd.dm_weight,
      regression_weight=config.regression.weight,
      fake_updates_per_generator_update=n,
      ema_decay=config.ema.decay,
      constrain_batch=lambda x: jax.lax.with_sharding_constraint(x, batch),
  )


def build(config, teacher: Teacher, frozen: dict, mesh, workdir: str | None = None) -> Run:
  """Pure: the run of ``teacher`` on ``mesh`` — optimisers, the abstract state (``jax.eval_shape``, nothing
  allocated) and the shardings. ``frozen`` may be host arrays (then placed on the mesh) or
  ``jax.ShapeDtypeStruct``s (bench scripts that only compile)."""
  hyper = make_hyper(config, mesh)
  frozen_sh = sharding.frozen_sharding(mesh, frozen, config.mesh.min_shard_size)
  abstract = jax.eval_shape(lambda k: dmd.init_state(teacher, hyper, *teacher.init(k)),
                            streams.key(config.seed, "init"))
  state_sh = sharding.tree_sharding(mesh, abstract, config.mesh.min_shard_size)
  if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
    frozen = jax.device_put(frozen, frozen_sh)
  return Run(config, workdir, mesh, teacher, frozen, frozen_sh, hyper, abstract, state_sh)


def setup(config, workdir: str) -> Run:
  """Multi-host initialisation, the workdir, the mesh and the teacher (read from disk), then :func:`build`."""
  distributed = {"auto": None, "yes": True, "no": False}
  if config.distributed not in distributed:
    raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {config.distributed!r}")
  sharding.maybe_initialize_distributed(distributed[config.distributed])
  workdir = io.prepare_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  teacher, frozen = teachers.build(config, workdir)
  run = build(config, teacher, frozen, mesh, workdir)
  shardings = jax.tree.leaves(run.state_sharding)
  logging.info("mesh %s over %d devices; %d of %d state arrays FSDP-sharded (teacher %r)", dict(mesh.shape),
               mesh.devices.size, sum("fsdp" in s.spec for s in shardings), len(shardings), teacher.name)
  return run


def pair_store(run: Run) -> PairStore:
  r, teacher = run.config.regression, run.teacher
  spec = {"num_pairs": r.num_pairs, "shard_size": r.shard_size, "seed": run.config.seed,
          **teacher.sampler.spec, **teacher.conditions.spec}
  return PairStore(io.join(run.workdir, "pairs"), spec).open()


def ensure_pairs(run: Run) -> PairRows:
  """Builds the missing regression-pair shards (all processes), then opens the set for reading by rows
  (docs/method.md §5)."""
  teacher, frozen = run.teacher, run.frozen
  store = pair_store(run)
  build_pairs(store, lambda z, cond: teacher.sampler.sample(frozen["teacher"], z, cond), run.mesh,
              streams.key(run.config.seed, "pairs"), teacher.sample_shape, teacher.conditions)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("regression pairs built")
  return store.rows()


# ---------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------

# Steps dispatched ahead of the one the host last waited for. Enough to hide the host's work behind the
# device's; unbounded, two processes on XLA:CPU hung in a gloo all-reduce once ~100 steps were queued
# (docs/multihost.md).
MAX_STEPS_IN_FLIGHT = 4


def batches(run: Run, pairs: PairRows | None):
  """``step -> global batch``: this process's rows of the DM batch's host-side conditions and of the
  regression pairs (epoch order from the ``'regression_order'`` stream), assembled over the mesh."""
  config, conditions, mesh = run.config, run.teacher.conditions, run.mesh
  b, b_reg = config.batch_size, config.regression.batch_size
  dm_rows, reg_rows = sharding.process_slice(b), sharding.process_slice(b_reg)
  order = None if pairs is None else EpochSampler(len(pairs), b_reg,
                                                  streams.numpy_seed(config.seed, "regression_order"))

  def batch_for(step: int) -> dict:
    out = sharding.global_batch(mesh, conditions.for_step(step, b, dm_rows), b)
    if order is not None:
      idx = order.indices(step)[reg_rows]
      rows = pairs.take(idx)    # only this process's rows are read
      # sets of unconditional teachers built before every pair stored its condition have no 'cond'
      cond = rows["cond"] if "cond" in rows else conditions.for_pairs(idx)
      out.update(sharding.global_batch(mesh, {"reg_z": rows["z"], "reg_x": rows["x"],
                                              "reg_cond": conditions.lookup(cond)}, b_reg))
    return out
  return batch_for


def train(config, workdir: str) -> dict | None:
  from dmd_jax.evaluation import evaluators as evaluators_lib
  t_start = time.time()
  run = setup(config, workdir)
  workdir = run.workdir
  writer = writers.create_writer(workdir, run.is_main)
  ckpt = checkpoint.Checkpointer(workdir)

  # ---- state: resume from the latest checkpoint, or start fresh ----
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = run.restore(ckpt, latest)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = run.init_state()
  start = int(jax.device_get(state["step"]))
  total = config.num_train_steps
  if start >= total:
    logging.info("this run has finished: step %d of %d in %s (nothing to do)", start, total, workdir)
    print(f"run already finished at step {start}/{total}; outputs are in {workdir}")
    return None

  # ---- regression pairs ----
  pairs = None
  if config.regression.weight > 0:
    pairs = ensure_pairs(run)
    logging.info("regression set: %d pairs", len(pairs))
  batch_for = batches(run, pairs)
  evaluators = evaluators_lib.build(run, writer)

  # ---- compile once ----
  example = batch_for(start)
  step_key = streams.key(config.seed, "train")
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(run.mesh), example)
  repl = sharding.replicated(run.mesh)
  step_fn = jax.jit(functools.partial(dmd.train_step, nets=run.teacher, hyper=run.hyper),
                    in_shardings=(run.state_sharding, run.frozen_sharding, batch_sh, repl),
                    out_shardings=(run.state_sharding, repl), donate_argnums=(0,))
  t_compile = time.time()
  step_fn = step_fn.lower(state, run.frozen, example, step_key).compile()
  logging.info("compiled the train step in %.1f s", time.time() - t_compile)

  # ---- loop ----
  eval_every = config.eval.get("every_steps", 0)
  preemption = Preemption(MAX_STEPS_IN_FLIGHT)
  meta = {"config": config.to_json_best_effort()}
  t_loop, last_log, last_step = time.time(), time.time(), start
  step = start
  try:
    in_flight = collections.deque()
    while step < total:
      batch = example if step == start else batch_for(step)
      state, metrics = step_fn(state, run.frozen, batch, step_key)
      step += 1
      in_flight.append(metrics["fake_score_loss"])
      if len(in_flight) > MAX_STEPS_IN_FLIGHT:   # bound the dispatch queue (see MAX_STEPS_IN_FLIGHT)
        in_flight.popleft().block_until_ready()
      if step % config.log_every == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = (step - last_step) / max(now - last_log, 1e-9)
        metrics["steps_per_sec"] = rate
        writer.write_scalars(step, metrics)
        logging.info("step %d/%d  %.1f steps/s  ETA %.0f s", step, total, rate, (total - step) / rate)
        last_log, last_step = now, step
      if eval_every and step % eval_every == 0 and step < total:
        evaluators_lib.run_all(run, evaluators, generator_params(state["generator"]), step, final=False)
      stop = preemption.should_stop(step)
      if step % config.checkpoint_every == 0 or step == total or stop:
        ckpt.save(step, state, {**meta, "step": step})
      if stop and step < total:
        ckpt.wait()
        logging.warning("stopped by SIGTERM at step %d; rerun the same command to resume", step)
        raise Preempted(f"preempted: checkpoint of step {step} saved in {ckpt.directory}; rerun to resume")
  finally:
    preemption.restore()
    ckpt.wait()
  train_seconds = time.time() - t_loop
  writer.flush()

  # ---- final evaluation and pictures ----
  results = evaluators_lib.run_all(run, evaluators, generator_params(state["generator"]), step, final=True)
  results.update(train_seconds=train_seconds, total_seconds=time.time() - t_start, steps=step)
  if run.is_main:
    io.write_json(io.join(workdir, "metrics.json"), results)
  writer.flush()
  ckpt.close()
  print(json.dumps(evaluators_lib.summary(results), indent=1))
  return results


def generator_params(gen_state) -> dict:
  """The generator parameters used for sampling: the EMA when there is one."""
  return gen_state.get("ema_params", gen_state["params"])
