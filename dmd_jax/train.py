"""The trainer: build (config → teacher, mesh, shardings, abstract state), then the loop — restore or init,
compile once, step, periodic actions (logging, evaluators, checkpoints), SIGTERM. What the step computes is
``dmd.train_step``; what the evaluators measure is ``evaluation/evaluators.py``; the other modes are
``modes.py`` (docs/architecture.md)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
from absl import logging

from dmd_jax import (checkpoint, distributed, dmd, families, io, loop, lora, preemption, sharding,
                     streams, writers)
from dmd_jax.data.indexed import StepIndexed
from dmd_jax.data.pairs import PairRows, PairStore, build_pairs
from dmd_jax.data.real import make_real_data
from dmd_jax.evaluation import evaluators as evaluators_lib
from dmd_jax.families.base import Teacher


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
  lora: dict = dataclasses.field(default_factory=dict)    # 'generator' / 'fake_score' -> lora.Plan (LoRA runs)
  lora_fingerprint: dict | None = None                    # the base network's identity (lora.fingerprint)
  cache: dict = dataclasses.field(default_factory=dict)   # compiled helpers and loaded eval networks

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def _init(self, key, frozen):
    return init_state(self.teacher, self.hyper, key, frozen, self.lora)

  def init_state(self):
    """The initial train state on the mesh: the teacher copies come from the frozen arrays already there
    (an argument of the jit, not constants), never from a host copy."""
    key = streams.key(self.config.seed, "init")
    return jax.jit(self._init, in_shardings=(sharding.replicated(self.mesh), self.frozen_sharding),
                   out_shardings=self.state_sharding)(key, self.frozen)

  def jit_train_step(self, batch):
    """``dmd.train_step`` jitted as training runs it: the state (sharded as ``state_sharding``) donated, the
    frozen arrays as placed, the per-step ``batch`` (arrays or ShapeDtypeStructs: its structure sets the
    shardings) over the batch axes, the key replicated. ``(state, frozen, batch, key) -> (state, metrics)``."""
    repl = sharding.replicated(self.mesh)
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(self.mesh), batch)
    return jax.jit(functools.partial(dmd.train_step, teacher=self.teacher, hyper=self.hyper),
                   in_shardings=(self.state_sharding, self.frozen_sharding, batch_sh, repl),
                   out_shardings=(self.state_sharding, repl), donate_argnums=(0,))

  def jit_generator_step(self, batch):
    """``dmd.generator_update`` alone, jitted with the same shardings (the generator state donated):
    ``(gen_state, frozen, fake_params, z, cond, batch, rng, step) -> (gen_state, x, metrics)``."""
    gen_sh, fake_sh = self.state_sharding["generator"], self.state_sharding["fake_score"]
    rows, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)

    def generator(gen_state, frozen, fake_params, z, cond, batch, rng, step):
      return dmd.generator_update(gen_state, self.teacher, self.hyper, frozen, fake_params, z, cond, batch, rng,
                                  step)
    return jax.jit(generator, in_shardings=(gen_sh, self.frozen_sharding, fake_sh["params"], rows, rows,
                                            jax.tree.map(lambda _: rows, batch), repl, repl),
                   out_shardings=(gen_sh, rows, repl), donate_argnums=(0,))

  def jit_fake_step(self, batch):
    """``dmd.fake_score_update`` alone, jitted with the same shardings (the fake-score state donated):
    ``(fake_state, frozen, x, cond, batch, rng, step) -> (fake_state, metrics)``."""
    fake_sh = self.state_sharding["fake_score"]
    rows, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)

    def fake(fake_state, frozen, x, cond, batch, rng, step):
      return dmd.fake_score_update(fake_state, self.teacher, self.hyper, frozen, x, cond, batch, rng, step)
    return jax.jit(fake, in_shardings=(fake_sh, self.frozen_sharding, rows, rows, jax.tree.map(lambda _: rows, batch),
                                       repl, repl),
                   out_shardings=(fake_sh, repl), donate_argnums=(0,))

  def sample(self, params, z, cond, keys):
    """The generator's samples with the configured ``generator.steps`` (``dmd.sample_generator``; ``keys`` [N]
    seed each sample's fresh noise between steps)."""
    return dmd.sample_generator(self.teacher, self.hyper.generator_steps, params, z, cond, keys)

  @property
  def generator_nfe(self) -> int:
    return max(1, len(self.hyper.generator_steps))

  def restore(self, ckpt: checkpoint.Checkpointer, step: int):
    self.check_lora_base(ckpt, step)
    abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_sharding)
    return ckpt.restore(step, abstract)

  def restore_newest_intact(self, ckpt: checkpoint.Checkpointer) -> checkpoint.Restored | None:
    """The newest checkpoint of ``ckpt`` that reads back as written and that this run can resume (the same GAN
    stage, the same LoRA base: errors otherwise), restored into the run's shardings; damaged newer ones are
    moved aside (``Checkpointer.restore_newest_intact``). None when there is no checkpoint."""
    def check(step: int, meta: dict) -> None:
      check_same_stage(self, ckpt, step, meta)
      self.check_lora_base(ckpt, step, meta)
    abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_sharding)
    return ckpt.restore_newest_intact(abstract, check)

  def checkpoint_meta(self) -> dict:
    """What every checkpoint of this run records beside the state: the config, and for LoRA runs the base
    network's fingerprint (checked by :meth:`restore`)."""
    meta = {"config": self.config.to_json_best_effort()}
    if self.lora:
      meta["lora_teacher"] = self.lora_fingerprint
    return meta

  def check_lora_base(self, ckpt: checkpoint.Checkpointer, step: int, meta: dict | None = None) -> None:
    """LoRA adapters restore only onto the teacher they were trained on (a clear error otherwise). ``meta``: the
    step's JSON item when the caller has read it."""
    if self.lora and self.lora_fingerprint is not None:
      meta = ckpt.restore_meta(step) if meta is None else meta
      lora.check_fingerprint(meta.get("lora_teacher"), self.lora_fingerprint,
                             f"checkpoint {step} in {ckpt.directory}")

  def generator_params(self, gen_state):
    """The generator network's parameters for sampling: the EMA when there is one; a LoRA generator's
    adapters merged onto the teacher's arrays (one jitted call; the result lives as long as the caller keeps it)."""
    params = gen_state.get("ema_params", gen_state["params"])
    if "generator" not in self.lora:
      return params
    if "lora_merge" not in self.cache:
      self.cache["lora_merge"] = jax.jit(self.hyper.generator_network)
    return self.cache["lora_merge"](params, self.frozen)


def make_hyper(config, mesh) -> dmd.DMDHyper:
  """The static hyper-parameters of one DMD iteration (docs/method.md §6)."""
  o = config.optim
  n = config.dmd.fake_updates_per_generator_update
  if n < 1:
    raise ValueError(f"dmd.fake_updates_per_generator_update must be >= 1, got {n}")
  steps = dmd.generator_steps(config.generator.get("steps", ()), config.schedule.num_timesteps)
  g = config.gan
  if g.generator_weight < 0 or g.critic_weight < 0:
    raise ValueError(f"gan.generator_weight and gan.critic_weight must be >= 0, got {g.generator_weight} and "
                     f"{g.critic_weight}")
  num_timesteps = config.schedule.num_timesteps
  max_t = int(g.get("max_timestep", 0))
  if not 0 <= max_t <= num_timesteps:
    raise ValueError(f"gan.max_timestep must be in [1, schedule.num_timesteps={num_timesteps}] (0 = all), got "
                     f"{max_t}")
  lr = dmd.learning_rate_schedule(o.lr, o.warmup_steps, o.decay, config.num_train_steps,
                                  o.get("warmup_processes", 1))
  make = lambda: dmd.make_optimizer(o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
  batch = sharding.batch_sharding(mesh)
  n_dev = mesh.devices.size
  for name, b in (("batch_size", config.batch_size), ("regression.batch_size", config.regression.batch_size)):
    if b % n_dev:
      raise ValueError(f"{name}={b} must be divisible by the number of devices ({n_dev})")
  return dmd.DMDHyper(
      batch_size=config.batch_size,
      generator_optimizer=make(),
      fake_score_optimizer=make(),
      learning_rate=lr,
      dm_weight=config.dmd.dm_weight,
      regression_weight=config.regression.weight,
      fake_updates_per_generator_update=n,
      ema_decay=config.ema.decay,
      constrain_batch=lambda x: jax.lax.with_sharding_constraint(x, batch),
      generator_steps=steps,
      gan_generator_weight=float(g.generator_weight),
      gan_critic_weight=float(g.critic_weight),
      gan_max_timestep=max_t,
  )


def init_state(teacher: Teacher, hyper: dmd.DMDHyper, key, frozen: dict, lora_plans: dict | None = None):
  """The initial train state from the ``'init'`` stream's key and the frozen parameters (``Teacher.init``
  copies the teacher network from them: the arrays on the mesh, or abstract ones under ``jax.eval_shape``);
  the GAN head from ``fold_in(key, 1)``; LoRA adapters, where ``lora_plans`` has them, from ``fold_in(key, 2)``
  and ``fold_in(key, 3)``: they replace the network copies."""
  generator, fake = teacher.init(key, frozen)
  plans = lora_plans or {}
  if "generator" in plans:
    generator = plans["generator"].init(jax.random.fold_in(key, 2))
  if "fake_score" in plans:
    fake = plans["fake_score"].init(jax.random.fold_in(key, 3))
  return dmd.init_state(teacher, hyper, generator, fake, jax.random.fold_in(key, 1))


def lora_plans(config, teacher: Teacher, frozen: dict) -> dict:
  """``model.lora`` (rank 0: none): the adapters of the generator, and of the fake score with
  ``model.lora.fake_score``, on the teacher network's kernels (docs/lora.md). ``frozen``: the frozen parameters
  (host, placed or abstract: only their shapes are read)."""
  cfg = config.model.get("lora")
  if cfg is None or int(cfg.rank) == 0:
    return {}
  shapes = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), frozen)[0]
  plan = lora.plan(shapes, teacher.lora, cfg.rank, cfg.alpha, tuple(cfg.targets))
  return {"generator": plan, **({"fake_score": plan} if cfg.get("fake_score", False) else {})}


def with_lora(hyper: dmd.DMDHyper, teacher: Teacher, plans: dict) -> dmd.DMDHyper:
  """``hyper`` whose networks are formed from the teacher's frozen arrays and the adapters (``dmd.DMDHyper``'s
  ``generator_network`` / ``fake_network``)."""
  def network(plan):
    return lambda adapters, frozen: plan.merge(teacher.lora.params(frozen), adapters)
  fields = {"generator": "generator_network", "fake_score": "fake_network"}
  return dataclasses.replace(hyper, **{fields[k]: network(p) for k, p in plans.items()})


def build(config, teacher: Teacher, frozen: dict, mesh, workdir: str | None = None) -> Run:
  """Pure: the run of ``teacher`` on ``mesh`` — optimisers, the abstract state (``jax.eval_shape``, nothing
  allocated) and the shardings. ``frozen`` may be host arrays (then placed on the mesh: the Run keeps only the
  placed ones, so the caller's host dict is freed once the caller drops it) or ``jax.ShapeDtypeStruct``s (bench
  scripts that only compile)."""
  hyper = make_hyper(config, mesh)
  plans = lora_plans(config, teacher, frozen)
  hyper = with_lora(hyper, teacher, plans)
  frozen_sh = sharding.frozen_sharding(mesh, frozen, config.mesh.min_shard_size)
  abstract = jax.eval_shape(lambda k, f: init_state(teacher, hyper, k, f, plans), streams.key(config.seed, "init"),
                            frozen)
  state_sh = sharding.tree_sharding(mesh, abstract, config.mesh.min_shard_size)
  fingerprint = None
  if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
    if plans:
      fingerprint = lora.fingerprint(teacher.lora.params(frozen))
    frozen = jax.device_put(frozen, frozen_sh)
  return Run(config, workdir, mesh, teacher, frozen, frozen_sh, hyper, abstract, state_sh, plans, fingerprint)


def start_process(config, workdir: str) -> str:
  """Multi-host initialisation (``config.distributed``), the workdir (created; its absolute path) and the
  persistent compilation cache (``config.compilation_cache``)."""
  workdir = _start_process(config, workdir)
  enable_compilation_cache(getattr(config, "compilation_cache", "auto"), workdir)
  return workdir


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
  """JAX's persistent compilation cache, so that a restarted run (a preemption, a resume, ``--mode=eval``)
  loads its compiled programs instead of compiling them again. ``setting``: 'auto' (the default:
  ``<workdir>/compilation_cache``, unless ``JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir`` already
  names one), a path (local or ``gs://``, shared by several runs of one config), or '' (off). Returns the
  folder used."""
  current = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if setting == "auto":
    if current:
      return current
    setting = io.join(workdir, "compilation_cache")
  if not setting:
    return None
  if setting != current:
    jax.config.update("jax_compilation_cache_dir", setting)
    logging.info("persistent compilation cache: %s", setting)
  return setting


def _start_process(config, workdir: str) -> str:
  enabled = {"auto": None, "yes": True, "no": False}
  if config.distributed not in enabled:
    raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {config.distributed!r}")
  if distributed.maybe_initialize(enabled[config.distributed]):
    preemption.install()   # again: jax.distributed's preemption notifier replaced the SIGTERM handler
  if jax.process_count() == 1 or not io.is_remote(workdir):
    return io.prepare_workdir(workdir)
  first = jax.process_index() == 0
  prepared = io.prepare_workdir(workdir) if first else None   # one process probes and creates a remote folder
  distributed.barrier("workdir prepared")
  return prepared if first else io.prepare_workdir(workdir, probe=False)


def setup(config, workdir: str) -> Run:
  """Multi-host initialisation, the workdir, the mesh and the teacher (read from disk), then :func:`build`."""
  workdir = start_process(config, workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  teacher, frozen = families.build(config, workdir)
  run = build(config, teacher, frozen, mesh, workdir)
  del frozen   # the host parameters: the run holds the ones on the mesh (and the teacher no reference to these)
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
  distributed.barrier("regression pairs built")
  return store.rows()


# ---------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------

def batches(run: Run, pairs: PairRows | None, real=None):
  """``step -> global batch``: this process's rows of the DM batch's host-side conditions, of the
  regression pairs (``data.indexed.StepIndexed``: epoch order from the ``'regression_order'`` stream) and of the
  GAN critic's real samples (``real``: a ``data.real.RealData``; called for consecutive steps), assembled over
  the mesh."""
  config, conditions, mesh = run.config, run.teacher.conditions, run.mesh
  b, b_reg = config.batch_size, config.regression.batch_size
  dm_rows, reg_rows = sharding.process_slice(b), sharding.process_slice(b_reg)
  regression = None if pairs is None else StepIndexed(
      len(pairs), streams.numpy_seed(config.seed, "regression_order"), pairs.take)

  def batch_for(step: int) -> dict:
    out = sharding.global_batch(mesh, conditions.for_step(step, b, dm_rows), b)
    if regression is not None:
      rows = regression.batch(step, b_reg, reg_rows)    # only this process's rows are read
      out.update(sharding.global_batch(mesh, {"reg_z": rows["z"], "reg_x": rows["x"],
                                              "reg_cond": conditions.lookup(rows["cond"])}, b_reg))
    if real is not None:
      out.update(sharding.global_batch(mesh, real.batch(step, b, dm_rows), b))
    return out
  return batch_for


def train(config, workdir: str) -> dict | None:
  t_start = time.time()
  run = setup(config, workdir)
  workdir = run.workdir
  writer = writers.create_writer(workdir, run.is_main)
  ckpt = checkpoint.Checkpointer(workdir)

  # ---- state: resume from the newest intact checkpoint (damaged newer ones are moved aside: checkpoint.py),
  # or start from another run's networks, or fresh ----
  restored = run.restore_newest_intact(ckpt)
  latest = None if restored is None else restored.step
  meta_restored = {}
  init_from = config.get("init_from", {}).get("workdir", "")
  if restored is not None:
    state, meta_restored = restored.state, restored.meta
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
    for step, reason, where in restored.damaged:
      logging.warning("DAMAGED CHECKPOINT: step %d (%s) was skipped and moved to %s; resumed from step %d instead",
                      step, reason, where, latest)
  elif init_from:
    state = init_from_run(run, init_from, int(config.init_from.get("step", 0)))
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
  real = None
  if run.hyper.gan:
    real = make_real_data(run, config.gan.real_data)
    if latest is not None:
      real.restore(meta_restored["real_data"])
  batch_for = batches(run, pairs, real)
  evaluators = evaluators_lib.build(run, writer)

  # ---- compile once ----
  example = batch_for(start)
  step_key = streams.key(config.seed, "train")
  step_fn = run.jit_train_step(example)
  t_compile = time.time()
  with jax.set_mesh(run.mesh):   # the mesh in scope: activation sharding and TPU flash attention (docs/attention.md)
    step_fn = step_fn.lower(state, run.frozen, example, step_key).compile()
  logging.info("compiled the train step in %.1f s", time.time() - t_compile)

  # ---- loop (dmd_jax/loop.py) ----
  meta = run.checkpoint_meta()
  n_fake = run.hyper.fake_updates_per_generator_update
  curve = EvalCurve(workdir, start, n_fake, run.is_main)
  generator_step = {}   # the metrics of the last step that updated the generator (two time-scale rule)

  def one_step(state, i: int):
    state, metrics = step_fn(state, run.frozen, example if i == start else batch_for(i), step_key)
    if i % n_fake == 0:
      generator_step["metrics"] = metrics
    return state, metrics

  def with_generator_metrics(step: int, metrics):
    gen = generator_step.get("metrics", {})
    return {**metrics, **{k: v for k, v in gen.items() if k in dmd.GENERATOR_METRICS}}

  def periodic(ev):   # one loop action per evaluator with evals.<name>.every_steps > 0
    def evaluate(step: int, state, train_seconds: float) -> None:
      curve.add(step, train_seconds, ev.run(run.generator_params(state["generator"]), step, final=False),
                merge=True)
    return loop.Action(ev.every_steps, evaluate)

  done = loop.run(
      one_step, state, start=start, total=total, log_every=config.log_every, writer=writer,
      prepare_metrics=with_generator_metrics,
      on_retired=lambda m: check_skips(int(m["consecutive_skips"]), config, ckpt),
      actions=[periodic(ev) for ev in evaluators if ev.every_steps], checkpointer=ckpt,
      checkpoint_every=config.checkpoint_every,
      meta=lambda step: {**meta, "step": step, **({"real_data": real.state()} if real else {})})
  state, step, train_seconds, last_metrics = done.state, done.step, done.train_seconds, done.last_metrics
  writer.flush()

  # ---- final evaluation and pictures ----
  results = evaluators_lib.run_all(run, evaluators, run.generator_params(state["generator"]), step, final=True)
  results.update(train_seconds=train_seconds, total_seconds=time.time() - t_start, steps=step,
                 generator_updates=generator_updates(step, n_fake))
  curve.add(step, train_seconds, results)
  results["train_metrics"] = last_metrics
  if run.is_main:
    io.write_json(io.join(workdir, "metrics.json"), results)
  writer.flush()
  ckpt.close()
  print(json.dumps(evaluators_lib.summary(results), indent=1))
  return results


def generator_updates(step: int, n: int) -> int:
  """How many of iterations 0 .. step−1 updated the generator (every n-th, from 0: the two time-scale rule)."""
  return (step + n - 1) // n


class EvalCurve:
  """``<workdir>/eval_curve.json``: a row for every step with a periodic evaluation (``evals.<name>.every_steps``;
  evaluators due at the same step share the row) and the final one — step, generator updates, training seconds so far (the loop's time since the compiled step started, without
  the evaluations) and the evaluators' results. A resumed run keeps the rows up to its checkpoint's step and
  adds its own (train seconds continue from the last kept row)."""

  def __init__(self, workdir: str, start: int, n_fake: int, is_main: bool):
    self.path, self.n_fake, self.is_main = io.join(workdir, "eval_curve.json"), n_fake, is_main
    rows = io.read_json(self.path) if io.exists(self.path) else []
    self.rows = [r for r in rows if r["step"] <= start]
    self.offset = self.rows[-1]["train_seconds"] if self.rows else 0.0

  def add(self, step: int, train_seconds: float, results: dict, merge: bool = False) -> None:
    """A row for ``step`` (replacing one there; ``merge``: adding to the results of one written there in this
    run, for periodic evaluators due at the same step)."""
    results = {k: v for k, v in results.items() if k not in ("step", "train_seconds", "total_seconds", "steps")}
    if not results or not self.is_main:
      return
    if merge and self.rows and self.rows[-1]["step"] == step:
      self.rows[-1].update(results)
    else:
      self.rows = [r for r in self.rows if r["step"] < step]
      self.rows.append({"step": step, "generator_updates": generator_updates(step, self.n_fake),
                        "train_seconds": self.offset + train_seconds, **results})
    io.write_json(self.path, self.rows)


def config_has_gan(config_json: str) -> bool:
  """Whether a checkpoint's recorded config (JSON) trained DMD2's GAN critic head."""
  gan = json.loads(config_json or "{}").get("gan", {})
  return gan.get("generator_weight", 0) > 0 or gan.get("critic_weight", 0) > 0


def check_same_stage(run: Run, ckpt: checkpoint.Checkpointer, step: int, meta: dict | None = None) -> None:
  """A run resumes only checkpoints of its own kind: one written with the GAN head (or without it) cannot go on
  as a run without it (or with it). A new stage is a new workdir initialised from this one (``init_from``).
  ``meta``: the step's JSON item when the caller has read it."""
  meta = ckpt.restore_meta(step) if meta is None else meta
  had = config_has_gan(meta.get("config", ""))
  if had != run.hyper.gan:
    raise ValueError(
        f"checkpoint {step} in {ckpt.directory} was written {'with' if had else 'without'} DMD2's GAN critic head, "
        f"but this config {'has' if run.hyper.gan else 'has no'} GAN terms (gan.generator_weight / "
        f"gan.critic_weight). To start a new stage from that run (e.g. configs/imagenet64.py:dmd2,stage2 after "
        f":ttur), use a new --workdir with --config.init_from.workdir={run.workdir}")


def init_from_run(run: Run, workdir: str, step: int = 0):
  """The initial state from another run's checkpoint (``config.init_from``; the official ``--ckpt_only_path``):
  the generator's and the fake score's parameters (and the generator's EMA, where both runs keep one) come from
  checkpoint ``step`` (0 = the latest) of ``workdir``; the GAN head too when that run had one (else it is new);
  the optimiser states, the step counter and with them the learning-rate warm-up start afresh at 0."""
  src = checkpoint.Checkpointer(workdir, read_only=True)
  steps = src.all_steps()
  if not steps:
    raise FileNotFoundError(f"init_from.workdir={workdir} holds no checkpoint")
  step = step or steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"init_from.step={step}: {workdir} holds checkpoints {steps}")
  src_config = json.loads(src.restore_meta(step).get("config", "{}"))
  src_gan = config_has_gan(json.dumps(src_config))
  src_ema = float(src_config.get("ema", {}).get("decay", 0.0))
  hyper_src = dataclasses.replace(run.hyper, gan_generator_weight=1.0 if src_gan else 0.0,
                                  gan_critic_weight=1.0 if src_gan else 0.0, ema_decay=src_ema)
  run.check_lora_base(src, step)
  key = streams.key(run.config.seed, "init")
  abstract = jax.eval_shape(lambda k, f: init_state(run.teacher, hyper_src, k, f, run.lora), key, run.frozen)
  shardings = sharding.tree_sharding(run.mesh, abstract, run.config.mesh.min_shard_size)
  old, _ = src.restore(step, checkpoint.abstract_with_shardings(abstract, shardings))
  src.close()
  state = run.init_state()   # fresh optimiser states (Adam's are zeros, whatever the parameters) and GAN head
  gen = dict(state["generator"], params=old["generator"]["params"])
  if "ema_params" in gen:
    gen["ema_params"] = old["generator"].get("ema_params", old["generator"]["params"])
  score = dmd.score_params(hyper_src, old["fake_score"]["params"])
  if run.hyper.gan:
    head = old["fake_score"]["params"]["head"] if src_gan else state["fake_score"]["params"]["head"]
    fake_params = {"score": score, "head": head}
  else:
    fake_params = score
  state = {**state, "generator": gen, "fake_score": dict(state["fake_score"], params=fake_params)}
  state = jax.device_put(state, run.state_sharding)
  logging.info("initialised from checkpoint %d of %s: the generator's and fake score's parameters%s; new optimiser "
               "states, starting at step 0", step, workdir,
               " and the GAN head" if run.hyper.gan and src_gan else (", a new GAN head" if run.hyper.gan else ""))
  return state


def check_skips(consecutive: int, config, ckpt) -> None:
  """Stops the run once ``optim.max_consecutive_skips`` steps in a row had non-finite gradients (the skipped
  steps changed no parameters, so every checkpoint on disk holds good ones)."""
  limit = config.optim.get("max_consecutive_skips", 10)
  if consecutive >= limit:
    raise FloatingPointError(
        f"{consecutive} consecutive train steps had non-finite gradients (optim.max_consecutive_skips={limit}); "
        f"stopping. The checkpoints in {ckpt.directory} hold the last good parameters: lower optim.lr or the "
        f"GAN weights, or raise optim.max_consecutive_skips, and rerun to resume")


