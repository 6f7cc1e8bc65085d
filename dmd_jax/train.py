"""The host-side loop: mesh → networks → regression pairs → state (fresh or resumed) → compiled step →
periodic logging / checkpoints → final evaluation. Also the ``sample``, ``eval`` and ``pairs`` modes."""
from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dmd_jax import checkpoint, dmd, networks, sharding, writers
from dmd_jax.data.pairs import EpochSampler, PairStore, build_pairs, pair_labels
from dmd_jax.data.toy import GaussianMixture
from dmd_jax.evaluation import images as image_io
from dmd_jax.evaluation import text_to_image as t2i
from dmd_jax.evaluation import toy as toy_eval


# ---------------------------------------------------------------------------------------------------
# Set-up shared by every mode.
# ---------------------------------------------------------------------------------------------------

def prepare_workdir(workdir: str) -> str:
  """Creates ``workdir`` (local paths) and checks it is a writable folder; clear errors otherwise."""
  if not workdir:
    raise ValueError("--workdir is required")
  if "://" in workdir:
    return workdir
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not a writable directory: {e}") from e
  return workdir


class Setup:
  """Everything built from the config before a mode runs."""

  def __init__(self, config, workdir: str):
    distributed = {"auto": None, "yes": True, "no": False}.get(config.distributed)
    if config.distributed not in ("auto", "yes", "no"):
      raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {config.distributed!r}")
    sharding.maybe_initialize_distributed(distributed)
    self.config = config
    self.workdir = prepare_workdir(workdir)
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.nets, frozen = networks.build(config, self.workdir)
    self.frozen_sharding = sharding.frozen_sharding(self.mesh, frozen, config.mesh.min_shard_size)
    self.frozen = jax.device_put(frozen, self.frozen_sharding)
    self.hyper = make_hyper(config, self.nets, self.mesh)
    self.key = jax.random.PRNGKey(config.seed)
    self.init_key, self.step_key = jax.random.split(self.key)
    self.abstract_state = jax.eval_shape(self._init_state, self.init_key)
    self.state_sharding = sharding.tree_sharding(self.mesh, self.abstract_state, config.mesh.min_shard_size)
    self.is_main = jax.process_index() == 0
    self.inception = None   # (module, params) of the FID network, loaded on first use
    self.clip = None        # (module, params, tokenizer) of the CLIP-score model (text-to-image), likewise
    self.decode_jit = None  # latent families: jit(nets.decode), made on first use
    sharded = [s for s in jax.tree.leaves(self.state_sharding) if "fsdp" in s.spec]
    logging.info("mesh %s over %d devices; %d of %d state arrays FSDP-sharded",
                 dict(self.mesh.shape), self.mesh.devices.size, len(sharded),
                 len(jax.tree.leaves(self.state_sharding)))

  def _init_state(self, key):
    return dmd.init_state(self.nets, self.hyper, *self.nets.init(key))

  def init_state(self):
    return jax.jit(self._init_state, out_shardings=self.state_sharding)(self.init_key)

  def restore(self, ckpt: checkpoint.Checkpointer, step: int):
    abstract = checkpoint.abstract_with_shardings(self.abstract_state, self.state_sharding)
    return ckpt.restore(step, abstract)


def make_hyper(config, nets, mesh) -> dmd.DMDHyper:
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


def pair_store(config, workdir, nets=None) -> PairStore:
  r = config.regression
  spec = {"num_pairs": r.num_pairs, "shard_size": r.shard_size, "seed": config.seed,
          "sampler": "edm_heun", "sampler_steps": r.sampler_steps}
  if nets is not None:
    spec.update(dict(nets.pair_spec))
  return PairStore(os.path.join(workdir, "pairs"), spec).open()


def ensure_pairs(setup: Setup) -> dict[str, np.ndarray]:
  """Builds the missing regression-pair shards (all processes), then loads the whole set."""
  nets = setup.nets
  store = pair_store(setup.config, setup.workdir, nets)
  teacher = setup.frozen["teacher"]
  seed = setup.config.seed + 1
  cond_fn = (lambda idx: pair_labels(seed, idx, nets.num_classes)) if nets.num_classes else nets.pair_cond
  build_pairs(store, lambda z, cond: nets.teacher_sample(teacher, z, cond), setup.mesh,
              seed=seed, sample_shape=nets.sample_shape, cond_fn=cond_fn, cond_input_fn=nets.cond_table)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("regression pairs built")
  return store.load()


# ---------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------

class _SigtermFlag:
  def __init__(self):
    self.raised = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def train(config, workdir: str) -> dict | None:
  t_start = time.time()
  setup = Setup(config, workdir)
  workdir = setup.workdir
  writer = writers.create_writer(workdir, setup.is_main)
  ckpt = checkpoint.Checkpointer(workdir)

  # ---- state: resume from the latest checkpoint, or start fresh ----
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = setup.restore(ckpt, latest)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = setup.init_state()
  start = int(jax.device_get(state["step"]))
  total = config.num_train_steps
  if start >= total:
    logging.info("this run has finished: step %d of %d in %s (nothing to do)", start, total, workdir)
    print(f"run already finished at step {start}/{total}; outputs are in {workdir}")
    return None

  # ---- regression pairs ----
  pairs = sampler = None
  if config.regression.weight > 0:
    pairs = ensure_pairs(setup)
    sampler = EpochSampler(len(pairs["index"]), config.regression.batch_size, config.seed)
    logging.info("regression set: %d pairs", len(pairs["index"]))
  rows = sharding.process_slice(config.regression.batch_size)
  nets = setup.nets
  # Conditions drawn from a host-side set (SD prompt embeddings): ids per step, deterministic in the step.
  cond_sampler = (EpochSampler(nets.num_conds, config.batch_size, config.seed + 7)
                  if nets.cond_table is not None else None)
  dm_rows = sharding.process_slice(config.batch_size)

  def batch_for(step: int):
    out = {}
    if cond_sampler is not None:
      out.update(sharding.global_batch(
          setup.mesh, {"cond": nets.cond_table(cond_sampler.indices(step)[dm_rows])}, config.batch_size))
    if pairs is None:
      return out
    idx = sampler.indices(step)[rows]
    local = {"reg_z": pairs["z"][idx], "reg_x": pairs["x"][idx]}
    if "cond" in pairs:
      c = pairs["cond"][idx]
      local["reg_cond"] = c if nets.cond_table is None else nets.cond_table(c)
    out.update(sharding.global_batch(setup.mesh, local, config.regression.batch_size))
    return out

  # ---- compile once ----
  example = batch_for(start)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(setup.mesh), example)
  repl = sharding.replicated(setup.mesh)
  step_fn = jax.jit(functools.partial(dmd.train_step, nets=setup.nets, hyper=setup.hyper),
                    in_shardings=(setup.state_sharding, setup.frozen_sharding, batch_sh, repl),
                    out_shardings=(setup.state_sharding, repl), donate_argnums=(0,))
  t_compile = time.time()
  step_fn = step_fn.lower(state, setup.frozen, example, setup.step_key).compile()
  logging.info("compiled the train step in %.1f s", time.time() - t_compile)

  # ---- loop ----
  fid_every = config.eval.get("every_steps", 0)   # monitoring FID (image families)
  sigterm = _SigtermFlag()
  meta = {"config": config.to_json_best_effort()}
  t_loop, last_log, last_step = time.time(), time.time(), start
  step = start
  try:
    while step < total:
      batch = example if step == start else batch_for(step)
      state, metrics = step_fn(state, setup.frozen, batch, setup.step_key)
      step += 1
      if step % config.log_every == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = (step - last_step) / max(now - last_log, 1e-9)
        metrics["steps_per_sec"] = rate
        writer.write_scalars(step, metrics)
        logging.info("step %d/%d  %.1f steps/s  ETA %.0f s", step, total, rate, (total - step) / rate)
        last_log, last_step = now, step
      if fid_every and step % fid_every == 0 and step < total:
        n = config.eval.periodic_num_samples
        value = fid_of_generator(setup, generator_params(state["generator"]), n)
        writer.write_scalars(step, {f"eval/fid{n}": value})
        logging.info("monitoring FID (%d samples) at step %d: %.4f", n, step, value)
      if step % config.checkpoint_every == 0 or step == total or sigterm.raised:
        ckpt.save(step, state, {**meta, "step": step})
      if sigterm.raised:
        ckpt.wait()
        logging.warning("stopped by SIGTERM at step %d; rerun the same command to resume", step)
        return None
  finally:
    sigterm.restore()
    ckpt.wait()
  train_seconds = time.time() - t_loop
  writer.flush()

  # ---- final evaluation and pictures ----
  results = evaluate(setup, state["generator"], writer, step)
  results.update(train_seconds=train_seconds, total_seconds=time.time() - t_start, steps=step)
  if setup.is_main:
    _write_json(os.path.join(workdir, "metrics.json"), results)
  writer.flush()
  ckpt.close()
  print(json.dumps(_summary(results), indent=1))
  return results


def _write_json(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _summary(results: dict) -> dict:
  keep = ("tv", "precision", "min_mode_share", "mmd2_ratio")
  out = {}
  for who in ("generator", "teacher"):
    if who in results:
      out[who] = {k: round(results[who][k], 4) for k in keep if k in results[who]}
  for k in ("fid", "fid_num_samples", "train_seconds", "total_seconds", "steps"):
    if k in results:
      out[k] = round(results[k], 1) if isinstance(results[k], float) else results[k]
  return out


# ---------------------------------------------------------------------------------------------------
# Sampling and evaluation.
# ---------------------------------------------------------------------------------------------------

def generator_params(gen_state) -> dict:
  """The generator parameters used for sampling: the EMA when there is one."""
  return gen_state.get("ema_params", gen_state["params"])


def _sample_chunks(setup: Setup, fn, params, num: int, seed: int, chunk: int):
  """Yields ``(x, cond)`` host chunks of ``fn(params, z, cond)`` over fresh noise / conditions; chunk i uses
  ``fold_in(key(seed), i)``, so the samples do not depend on the device count."""
  nets = setup.nets
  batch = sharding.batch_sharding(setup.mesh)
  n_dev = setup.mesh.devices.size
  chunk = -(-min(chunk, num) // n_dev) * n_dev

  @functools.partial(jax.jit, out_shardings=batch)
  def one(params, key):
    r_z, r_c = jax.random.split(key)
    z = jax.lax.with_sharding_constraint(nets.sample_noise(r_z, chunk), batch)
    cond = nets.sample_cond(r_c, chunk)
    return fn(params, z, cond), (cond if nets.num_classes else jnp.zeros((chunk,), jnp.int32))

  key = jax.random.PRNGKey(seed)
  for i in range(-(-num // chunk)):
    x, c = jax.device_get(one(params, jax.random.fold_in(key, i)))
    keep = min(chunk, num - i * chunk)
    yield np.asarray(x)[:keep], (np.asarray(c)[:keep] if nets.num_classes else None)


def _collect(chunks):
  xs, cs = zip(*chunks)
  return np.concatenate(xs), (None if cs[0] is None else np.concatenate(cs))


def generate(setup: Setup, params, num: int, seed: int, chunk: int = 4096):
  """``num`` one-step samples and their conditions (class labels or None), deterministic for ``seed``."""
  return _collect(_sample_chunks(setup, setup.nets.generate, params, num, seed, chunk))


def teacher_samples(setup: Setup, num: int, seed: int, chunk: int = 4096):
  """``num`` samples of the teacher's ODE sampler (same noise / condition recipe as ``generate``)."""
  return _collect(_sample_chunks(setup, setup.nets.teacher_sample, setup.frozen["teacher"], num, seed, chunk))


# ---- FID (method.md §8): Inception features of uint8 samples, data-parallel over the mesh ----

def _inception(setup: Setup):
  if setup.inception is None:
    from dmd_jax.convert import inception as inception_convert
    e, seed = setup.config.eval, setup.config.seed
    path = networks.frozen_network_dir(
        e.inception_path, "eval.inception_path", "inception", setup.workdir, seed,
        lambda dst: networks._write_random(dst, inception_convert.expected_shapes(),
                                           inception_convert.convert_file, seed))
    module, params = inception_convert.load_converted_inception(path)
    setup.inception = (module, jax.device_put(params, sharding.replicated(setup.mesh)))
  return setup.inception


def _fid_stats(setup: Setup, chunks) -> tuple[np.ndarray, np.ndarray, int]:
  from dmd_jax.evaluation import fid
  module, params = _inception(setup)
  e = setup.config.eval
  stats = fid.FeatureStats()
  t0 = time.time()
  for x, _ in chunks:
    stats.update(fid.inception_features(module, params, image_io.to_uint8(x), protocol=e.protocol,
                                        batch_size=e.batch_size, mesh=setup.mesh, log_every=0))
    logging.info("FID: %d images (%.1f images/s)", stats.count, stats.count / (time.time() - t0))
  mu, sigma = stats.mu_sigma()
  return mu, sigma, stats.count


def _reference_stats(setup: Setup):
  from dmd_jax.evaluation import fid
  e = setup.config.eval
  if not e.reference_stats:
    raise ValueError("eval.reference_stats is empty: pass an .npz with mu and sigma (e.g. EDM's fid-refs), "
                     "or 'teacher' for the statistics of the teacher's own samples")
  if e.reference_stats != "teacher":
    ref = fid.load_reference_stats(e.reference_stats)
    return ref["mu"], ref["sigma"]
  cache = os.path.join(setup.workdir, f"fid_reference_teacher_{e.num_samples}.npz")
  return _cached_teacher_reference(setup, cache, lambda: _fid_stats(setup, _sample_chunks(
      setup, setup.nets.teacher_sample, setup.frozen["teacher"], e.num_samples, setup.config.seed + 5000,
      e.batch_size))[:2])


def _cached_teacher_reference(setup: Setup, cache: str, compute):
  """(mu, sigma) of the teacher's samples: read from ``cache``, else ``compute()`` and written there."""
  from dmd_jax.evaluation import fid
  if os.path.exists(cache):
    ref = fid.load_reference_stats(cache)
    return ref["mu"], ref["sigma"]
  logging.info("FID reference: statistics of the teacher's samples (cached in %s)", cache)
  mu, sigma = compute()
  if setup.is_main:
    fid.save_reference_stats(cache, mu, sigma)
  return mu, sigma


def fid_of_generator(setup: Setup, params, num: int) -> float:
  from dmd_jax.evaluation import fid
  ref_mu, ref_sigma = _reference_stats(setup)
  mu, sigma, _ = _fid_stats(setup, _sample_chunks(setup, setup.nets.generate, params, num,
                                                  setup.config.seed + 3000, setup.config.eval.batch_size))
  return fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)


def evaluate(setup: Setup, gen_state, writer, step: int) -> dict:
  """Family-specific evaluation of the current generator; writes scalars and a picture."""
  config = setup.config
  if config.model.family == "toy":
    return _evaluate_toy(setup, gen_state, writer, step)
  if config.model.family == "sd":
    return _evaluate_sd(setup, gen_state, writer, step)
  results = _sample_grids(setup, gen_state, step)
  if config.eval.inception_path:
    n = config.eval.num_samples
    results["fid"] = fid_of_generator(setup, generator_params(gen_state), n)
    results["fid_num_samples"] = n
    results["fid_protocol"] = config.eval.protocol
    writer.write_scalars(step, {f"eval/fid{n}": results["fid"]})
    logging.info("FID (%d samples, %s protocol) at step %d: %.4f", n, config.eval.protocol, step, results["fid"])
  return results


# ---- text-to-image (method.md §8): COCO-30k FID (clean-fid protocol) and CLIP score ----

def _eval_captions(setup: Setup) -> list[str]:
  e, n = setup.config.eval, setup.config.eval.num_samples
  if e.captions == "coco_captions":
    return t2i.coco_captions(e.data_dir, e.captions_split, n, setup.workdir)
  if e.captions == "train_prompts":
    from dmd_jax.data.prompts import prompts_from_config
    base = prompts_from_config(setup.config.data)
  else:
    base = t2i.read_captions(e.captions)
  return [base[i % len(base)] for i in range(n)]


def _clip(setup: Setup):
  """(module, params, tokenizer) of the CLIP-score model, or None when ``eval.clip_path`` is empty."""
  e = setup.config.eval
  if not e.clip_path:
    return None
  if setup.clip is None:
    from dmd_jax.convert import clip as clip_convert
    # the random stand-in (:tiny) is seeded so that its scores are not all clamped to 0 by max(cos, 0)
    path = networks.frozen_network_dir(e.clip_path, "eval.clip_path", "clip", setup.workdir, setup.config.seed,
                                       lambda dst: clip_convert.write_random_converted_clip(dst, seed=3))
    module, params, tokenizer = clip_convert.load_converted_clip(path)
    setup.clip = (module, jax.device_put(params, sharding.replicated(setup.mesh)), tokenizer)
  return setup.clip


def _coco_evaluator(setup: Setup, with_clip: bool) -> t2i.CocoEvaluator:
  e = setup.config.eval
  return t2i.CocoEvaluator(setup.mesh, _inception(setup) if e.inception_path else None,
                           _clip(setup) if with_clip else None, e.batch_size, e.clip_resize_256)


def _coco_reference(setup: Setup, captions: list[str]):
  """(mu, sigma) the generator's statistics are compared with (``eval.reference_stats``)."""
  from dmd_jax.evaluation import fid
  e = setup.config.eval
  if e.reference_stats == "tfds":
    from dmd_jax.evaluation.reference_stats import reference_stats_from_tfds
    module, params = _inception(setup)
    cache = os.path.join(setup.workdir, f"fid_reference_coco_{t2i.split_tag(e.reference_split)}.npz")
    return reference_stats_from_tfds("coco_captions", e.reference_split, e.data_dir or None, module, params,
                                     protocol="clean", batch_size=e.batch_size, mesh=setup.mesh, cache_path=cache)
  if e.reference_stats == "teacher":
    cache = os.path.join(setup.workdir, f"fid_reference_teacher_{len(captions)}_{t2i.captions_digest(captions)}.npz")

    def compute():
      nets = setup.nets
      chunks = t2i.caption_images(nets, setup.frozen, setup.mesh, nets.teacher_sample, setup.frozen["teacher"],
                                  captions, setup.config.seed + 5000, e.batch_size)
      return t2i.run(chunks, _coco_evaluator(setup, with_clip=False), len(captions),
                     "FID reference (teacher)").stats.mu_sigma()
    return _cached_teacher_reference(setup, cache, compute)
  if not e.reference_stats:
    raise ValueError("eval.reference_stats is empty: pass an .npz with mu and sigma, 'tfds' (the COCO images "
                     "of eval.reference_split) or 'teacher' (the teacher's samples for the same captions)")
  ref = fid.load_reference_stats(e.reference_stats)
  return ref["mu"], ref["sigma"]


def _evaluate_sd(setup: Setup, gen_state, writer, step: int) -> dict:
  config, e = setup.config, setup.config.eval
  results = _sample_grids(setup, gen_state, step)
  if not (e.inception_path or e.clip_path) or e.num_samples <= 0:
    logging.info("no eval.inception_path / eval.clip_path: COCO FID and CLIP score skipped")
    return results
  captions = _eval_captions(setup)
  reference = _coco_reference(setup, captions) if e.inception_path else None
  nets = setup.nets
  chunks = t2i.caption_images(nets, setup.frozen, setup.mesh, nets.generate, generator_params(gen_state),
                              captions, config.seed + 3000, e.batch_size)
  ev = t2i.run(chunks, _coco_evaluator(setup, with_clip=True), len(captions), f"COCO eval, step {step}")
  metrics = ev.result(reference)
  n = len(captions)
  results.update(metrics, num_samples=n, captions=e.captions, fid_protocol="clean",
                 reference_stats=e.reference_stats)
  writer.write_scalars(step, {f"eval/{k}{n}": v for k, v in metrics.items()})
  logging.info("COCO eval at step %d on %d captions: %s", step, n,
               ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
  return results


def _evaluate_toy(setup: Setup, gen_state, writer, step: int) -> dict:
  config = setup.config
  mixture = GaussianMixture.from_config(config.toy)
  n = config.eval.num_samples
  gen, _ = generate(setup, generator_params(gen_state), n, seed=config.seed + 1000)
  teach, _ = teacher_samples(setup, n, seed=config.seed + 2000)
  floor = toy_eval.mmd2_floor(mixture, config.seed)
  results = {"generator": toy_eval.toy_metrics(gen, mixture, config.seed, floor),
             "teacher": toy_eval.toy_metrics(teach, mixture, config.seed, floor),
             "generator_nfe": 1, "teacher_nfe": 2 * config.regression.sampler_steps - 1,
             "step": step}
  writer.write_scalars(step, {f"eval/{who}/{k}": v for who in ("generator", "teacher")
                              for k, v in results[who].items() if not isinstance(v, list)})
  if setup.is_main:
    os.makedirs(os.path.join(setup.workdir, "samples"), exist_ok=True)
    path = os.path.join(setup.workdir, "samples", f"toy_step{step}.png")
    toy_eval.scatter_png(path, [(f"teacher Heun-{config.regression.sampler_steps} "
                                 f"({results['teacher_nfe']} NFE)", teach),
                                (f"one-step generator, step {step}", gen)], mixture)
    results["samples_png"] = path
  return results


def _teacher_nfe(setup: Setup) -> int:
  return setup.nets.teacher_nfe or 2 * setup.config.regression.sampler_steps - 1


def to_images(setup: Setup, x, chunk: int = 64) -> np.ndarray:
  """Samples → images in [-1, 1] (host): latent families decode (``nets.decode``), others pass through."""
  decode = setup.nets.decode
  if decode is None:
    return np.asarray(x)
  if setup.decode_jit is None:
    setup.decode_jit = jax.jit(decode)
  return np.concatenate([np.asarray(jax.device_get(setup.decode_jit(setup.frozen, x[i:i + chunk])))
                         for i in range(0, len(x), chunk)])


def _sample_grids(setup: Setup, gen_state, step: int, num: int | None = None) -> dict:
  """Image families: a grid of one-step samples above a grid of teacher samples (same seed recipe)."""
  config = setup.config
  num = config.eval.get("grid_samples", 64) if num is None else num
  results = {"step": step, "generator_nfe": 1, "teacher_nfe": _teacher_nfe(setup)}
  if num <= 0:        # eval.grid_samples=0: no picture
    return results
  gen, _ = generate(setup, generator_params(gen_state), num, seed=config.seed + 1000)
  teach, _ = teacher_samples(setup, num, seed=config.seed + 1000)
  gen, teach = to_images(setup, gen), to_images(setup, teach)
  if setup.is_main:
    os.makedirs(os.path.join(setup.workdir, "samples"), exist_ok=True)
    path = os.path.join(setup.workdir, "samples", f"step{step}.png")
    cols = int(np.ceil(np.sqrt(num)))
    g, t = image_io.grid(image_io.to_uint8(gen), cols), image_io.grid(image_io.to_uint8(teach), cols)
    image_io.save_png(path, np.concatenate([g, np.full((8,) + g.shape[1:], 255, np.uint8), t]))
    results["samples_png"] = path
  return results


def _latest_generator(setup: Setup):
  ckpt = checkpoint.Checkpointer(setup.workdir, read_only=True)
  latest = ckpt.latest_step()
  if latest is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (same --workdir)")
  state, _ = setup.restore(ckpt, latest)
  return state["generator"], latest


def _write_samples(setup: Setup, output: str, x: np.ndarray, cond, **extra) -> None:
  """Toy: float ``samples`` [N, D]; images: uint8 NHWC ``samples`` plus ``labels`` (conditional nets)."""
  if not output.endswith(".npz"):
    raise ValueError(f"--output must be a .npz file, got {output!r}")
  if not setup.is_main:
    return
  arrays = {"samples": x if setup.config.model.family == "toy" else image_io.to_uint8(x), **extra}
  if cond is not None:
    arrays["labels"] = np.asarray(cond, np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + f".tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, output)


def sample(config, workdir: str, num_samples: int, output: str, seed: int, prompt: str | None = None) -> str:
  """Writes ``num_samples`` one-step samples of the latest checkpoint to ``output``: an .npz, or for
  text-to-image families (``prompt`` given) a PNG grid of the decoded images."""
  if config.model.family == "sd" or prompt is not None:
    return sample_prompt(config, workdir, prompt, num_samples, output, seed)
  if not output.endswith(".npz"):
    raise ValueError(f"--output must be a .npz file, got {output!r}")
  setup = Setup(config, workdir)
  gen_state, step = _latest_generator(setup)
  x, cond = generate(setup, generator_params(gen_state), num_samples, seed)
  _write_samples(setup, output, to_images(setup, x), cond, step=step, seed=seed)
  print(f"wrote {num_samples} samples of step {step} to {output}")
  return output


def sample_prompt(config, workdir: str, prompt: str | None, num_samples: int, output: str, seed: int) -> str:
  """Text-to-image: ``num_samples`` one-step images of the latest checkpoint for ``prompt`` (VAE-decoded), as
  one PNG grid at ``output``; image i uses the noise of ``fold_in(key(seed), i)``, so the grid depends on
  ``seed`` only (not on the device count or how many images come before it)."""
  if config.model.family != "sd":
    raise ValueError(f"--prompt needs a text-to-image config (model.family='sd'), got {config.model.family!r}")
  if prompt is None:
    raise ValueError(f"--mode=sample for model.family={config.model.family!r} needs --prompt=\"...\"")
  if not output.lower().endswith(".png"):
    raise ValueError(f"--output must be a .png file for --prompt, got {output!r}")
  if num_samples < 1:
    raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
  setup = Setup(config, workdir)
  nets = setup.nets
  gen_state, step = _latest_generator(setup)
  cond = jnp.asarray(nets.encode_text([prompt]), jnp.float32)            # [1, L, D]
  key = jax.random.PRNGKey(seed)
  z = jax.vmap(lambda i: nets.sample_noise(jax.random.fold_in(key, i), 1)[0])(jnp.arange(num_samples))
  gen = jax.jit(lambda p, z, c: nets.generate(p, z, jnp.broadcast_to(c, (z.shape[0],) + c.shape[1:])))
  params = generator_params(gen_state)
  x = np.concatenate([np.asarray(jax.device_get(gen(params, z[i:i + 16], cond)))
                      for i in range(0, num_samples, 16)])
  images = image_io.to_uint8(to_images(setup, x))
  if setup.is_main:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}.png"
    image_io.save_png(tmp, image_io.grid(images, int(np.ceil(np.sqrt(num_samples)))))
    os.replace(tmp, output)
  print(f"wrote {num_samples} one-step images of step {step} for {prompt!r} to {output}")
  return output


def sample_teacher(config, workdir: str, num_samples: int, output: str, seed: int) -> str:
  """Writes ``num_samples`` teacher ODE samples (baselines) in the ``--mode=sample`` format."""
  if not output.endswith(".npz"):
    raise ValueError(f"--output must be a .npz file, got {output!r}")
  setup = Setup(config, workdir)
  x, cond = teacher_samples(setup, num_samples, seed)
  _write_samples(setup, output, to_images(setup, x), cond, seed=seed, nfe=_teacher_nfe(setup))
  print(f"wrote {num_samples} teacher samples to {output}")
  return output


def evaluate_latest(config, workdir: str) -> dict:
  setup = Setup(config, workdir)
  gen_state, step = _latest_generator(setup)
  writer = writers.create_writer(setup.workdir, setup.is_main)
  results = evaluate(setup, gen_state, writer, step)
  if setup.is_main:
    _write_json(os.path.join(setup.workdir, f"eval_step{step}.json"), results)
  writer.flush()
  print(json.dumps(_summary(results), indent=1))
  return results


def make_pairs(config, workdir: str) -> None:
  setup = Setup(config, workdir)
  n = len(ensure_pairs(setup)["index"])
  print(f"regression set complete: {n} pairs in {os.path.join(setup.workdir, 'pairs')}")
