"""``--mode=teacher_train``: trains an EDM teacher from scratch with EDM's denoising objective (Karras et al.
2022, "Elucidating the design space", §5 and Table 1), for datasets small enough to train on here
(``configs/digits.py``; docs/digits.md).

The objective, with ``x`` a data batch, ``n ~ N(0, I)``, ``ln sigma ~ N(P_mean, P_std^2)`` per sample:

    L = E[ lambda(sigma) * mean_pixels (D(x + sigma n; sigma, c) - x)^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2

(EDM sums over pixels; the mean only rescales the loss, which Adam does not see). ``D`` is ``EDMPrecond``
(``models/edm.py``) of ``teacher_train.init_kwargs`` with dropout on. Adam (EDM: beta 0.9 / 0.999,
eps 1e-8) with the learning rate ramped up linearly over ``lr_rampup_images`` images; an EMA of the weights
with EDM's schedule: half-life ``ema_halflife_images`` images, but at most ``ema_rampup_ratio`` × the images
seen so far, i.e. ``beta = 0.5 ** (batch / min(halflife, ratio * images_seen))``.

Outputs under ``--workdir``:

- ``teacher_train/checkpoints/<step>``: Orbax checkpoints (parameters, EMA, Adam state, step) every
  ``checkpoint_every`` steps and at the end; a rerun of the same command resumes from the latest, and a
  SIGTERM saves one and exits with the preemption code, like training (``dmd_jax/preemption.py``). The batch
  of step ``s`` is a pure function of (seed, s), so a resumed run takes the batches of an uninterrupted one.
- ``teacher/``: the EMA weights in the converted-teacher format (``params.npz`` + ``config.json``, what
  ``python -m dmd_jax.convert edm`` writes), written at the end: point ``teacher.path`` at it.
- ``teacher_samples.png``: a grid of the teacher's samples (EDM Heun, ``regression.sampler_steps`` steps),
  one row per class.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dmd_jax import checkpoint, io, loop, sharding, streams, writers
from dmd_jax import train as train_lib
from dmd_jax.convert.common import save_converted
from dmd_jax.data import digits
from dmd_jax.data.indexed import EpochSampler
from dmd_jax.evaluation import images as image_io
from dmd_jax.families.edm import convert as edm_convert
from dmd_jax.models import edm as edm_models
from dmd_jax.samplers import edm_heun_sample

TEACHER_FOLDER = "teacher"
CHECKPOINT_FOLDER = "teacher_train"


def dataset(config) -> tuple[np.ndarray, np.ndarray]:
  """The training images ``[N, S, S, C]`` in [-1, 1] and int32 labels of ``teacher_train.dataset``."""
  name = config.teacher_train.dataset
  if name == "digits":
    return digits.load(config.digits.image_size)
  raise ValueError(f"teacher_train.dataset must be 'digits', got {name!r}")


def edm_loss(params, module, x, labels, rng, *, p_mean: float, p_std: float, train: bool = True):
  """EDM's denoising loss (module docstring) of a batch ``x`` [N, H, W, C] with one-hot ``labels`` (or None)."""
  r_sigma, r_noise, r_drop = jax.random.split(rng, 3)
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(r_sigma, (x.shape[0],), jnp.float32))
  noise = jax.random.normal(r_noise, x.shape, jnp.float32) * sigma[:, None, None, None]
  d = module.apply({"params": params}, x + noise, sigma, labels, train=train, rngs={"dropout": r_drop})
  sd2 = module.sigma_data ** 2
  weight = (sigma ** 2 + sd2) / (sigma ** 2 * sd2)
  return jnp.mean(weight * jnp.mean((d.astype(jnp.float32) - x) ** 2, axis=(1, 2, 3)))


def ema_beta(images_seen, batch_size: int, halflife_images: float, rampup_ratio: float):
  """EDM's EMA decay after ``images_seen`` images (module docstring)."""
  halflife = jnp.minimum(halflife_images, rampup_ratio * images_seen) if rampup_ratio > 0 else halflife_images
  return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def _module_and_kwargs(config):
  cfg = config.teacher_train
  if not cfg.init_kwargs:
    raise ValueError("teacher_train.init_kwargs is empty: the JSON EDM init_kwargs of the network to train")
  kw = json.loads(cfg.init_kwargs)
  return edm_models.edm_module_from_kwargs(kw), kw


def _optimizer(cfg):
  ramp = max(1, -(-int(cfg.lr_rampup_images) // int(cfg.batch_size)))   # steps
  lr = lambda step: cfg.lr * jnp.minimum(1.0, (step + 1) / ramp)
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def init_state(module, optimizer, key) -> dict:
  params = module.init(key, *edm_models.init_inputs(module))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params),
          "opt_state": optimizer.init(params)}


def train_step(state, x, labels, key, *, module, optimizer, cfg):
  """One Adam step on a global batch; returns ``(state, metrics)``. The step's noise is ``fold_in(key, step)``."""
  step = state["step"]
  loss, grads = jax.value_and_grad(edm_loss)(state["params"], module, x, labels, jax.random.fold_in(key, step),
                                             p_mean=cfg.p_mean, p_std=cfg.p_std)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  b = x.shape[0]
  beta = ema_beta((step + 1).astype(jnp.float32) * b, b, cfg.ema_halflife_images, cfg.ema_rampup_ratio)
  ema = jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, state["ema"], params)
  new = {"step": step + 1, "params": params, "ema": ema, "opt_state": opt_state}
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "ema_beta": beta}


def _write_teacher(workdir: str, ema, kw: dict, step: int) -> str:
  dst = io.join(workdir, TEACHER_FOLDER)
  save_converted(dst, jax.device_get(ema), {"network": edm_convert.NETWORK, "init_kwargs": kw,
                                            "source": f"dmd_jax --mode=teacher_train, step {step} (EMA)"})
  return dst


def _sample_grid(config, module, ema, workdir: str) -> str:
  """A PNG of Heun samples of the EMA weights: 10 per class (one row per class), noise from the
  ``'sample_grid'`` stream."""
  s = config.schedule
  label_dim, per = module.label_dim, 10
  rows = max(label_dim, 1)
  labels = jnp.repeat(jnp.arange(rows), per)
  onehot = jax.nn.one_hot(labels, label_dim) if label_dim else None
  shape = (rows * per, module.img_resolution, module.img_resolution, module.img_channels)
  z = jax.random.normal(streams.key(config.seed, "sample_grid"), shape, jnp.float32)
  x = jax.jit(lambda p, z: edm_heun_sample(lambda x, sg: module.apply({"params": p}, x, sg, onehot), z,
                                           config.regression.sampler_steps, s.sigma_min, s.sigma_max,
                                           s.rho))(ema, z)
  path = io.join(workdir, "teacher_samples.png")
  image_io.save_png(path, image_io.grid(image_io.to_uint8(np.asarray(x)), per))
  return path


def train(config, workdir: str) -> dict | None:
  """Trains (or resumes) the teacher of ``config.teacher_train`` in ``workdir`` and writes it (module
  docstring). Returns ``{'teacher': folder, 'steps', 'train_seconds', 'final_loss'}``; None if it had
  finished already (the teacher folder is rewritten when missing)."""
  cfg = config.teacher_train
  t_start = time.time()
  workdir = train_lib.start_process(config, workdir)
  is_main = jax.process_index() == 0
  module, kw = _module_and_kwargs(config)
  images, labels = dataset(config)
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  if images.shape[1:] != shape:
    raise ValueError(f"teacher_train.dataset={cfg.dataset!r} gives images of shape {images.shape[1:]}, "
                     f"the network (teacher_train.init_kwargs) takes {shape}")
  if module.label_dim and labels.max() >= module.label_dim:
    raise ValueError(f"the dataset has {int(labels.max()) + 1} classes, the network label_dim={module.label_dim}")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  b = int(cfg.batch_size)
  if b % mesh.devices.size:
    raise ValueError(f"teacher_train.batch_size={b} is not divisible by the {mesh.devices.size} devices")
  optimizer = _optimizer(cfg)
  abstract = jax.eval_shape(lambda k: init_state(module, optimizer, k), streams.key(config.seed, "teacher_init"))
  state_sh = sharding.tree_sharding(mesh, abstract, config.mesh.min_shard_size)
  ckpt = checkpoint.Checkpointer(io.join(workdir, CHECKPOINT_FOLDER))
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(latest, checkpoint.abstract_with_shardings(abstract, state_sh))
    logging.info("teacher training: resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = jax.jit(lambda k: init_state(module, optimizer, k), out_shardings=state_sh)(
        streams.key(config.seed, "teacher_init"))
  start, total = int(jax.device_get(state["step"])), int(cfg.steps)
  if start >= total:
    ckpt.close()
    if not io.exists(io.join(workdir, TEACHER_FOLDER, "config.json")) and is_main:
      _write_teacher(workdir, state["ema"], kw, start)
    print(f"teacher training already finished at step {start}/{total}; the teacher is in "
          f"{io.join(workdir, TEACHER_FOLDER)}")
    return None

  order = EpochSampler(len(images), b, streams.numpy_seed(config.seed, "teacher_data_order"))
  rows = sharding.process_slice(b)
  label_dim = module.label_dim

  def batch_for(step):
    idx = order.indices(step)[rows]
    local = {"x": images[idx]}
    if label_dim:
      local["labels"] = np.eye(label_dim, dtype=np.float32)[labels[idx]]
    return sharding.global_batch(mesh, local, b)

  key = streams.key(config.seed, "teacher_train")
  repl = sharding.replicated(mesh)
  example = batch_for(start)
  batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), example)
  step_fn = jax.jit(lambda st, bt, k: train_step(st, bt["x"], bt.get("labels"), k, module=module,
                                                 optimizer=optimizer, cfg=cfg),
                    in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=(0,))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  logging.info("teacher training: %s %s, %d parameters, %d images, batch %d, steps %d..%d", module.model_type,
               shape, n_params, len(images), b, start, total)
  writer = writers.create_writer(io.join(workdir, CHECKPOINT_FOLDER), is_main)
  meta = {"config": config.to_json_best_effort()}

  def check_loss(step: int, metrics):
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"teacher training: the loss is {loss} at step {step}; lower "
                               "teacher_train.lr or resume from the last checkpoint")
    return metrics

  done = loop.run(lambda st, i: step_fn(st, example if i == start else batch_for(i), key), state,
                  start=start, total=total, what="teacher training", log_every=cfg.log_every, writer=writer,
                  log_keys=("loss",), prepare_metrics=check_loss, checkpointer=ckpt,
                  checkpoint_every=cfg.checkpoint_every, meta=lambda step: {**meta, "step": step})
  state, step, train_seconds = done.state, done.step, done.train_seconds
  loss = done.last_metrics.get("loss", float("nan"))
  writer.flush()
  ckpt.close()
  result = {"steps": step, "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
            "final_loss": loss}
  if is_main:
    result["teacher"] = _write_teacher(workdir, state["ema"], kw, step)
    result["samples_png"] = _sample_grid(config, module, jax.device_get(state["ema"]), workdir)
    io.write_json(io.join(workdir, "teacher_train.json"), result)
  print(json.dumps(result, indent=1))
  return result
