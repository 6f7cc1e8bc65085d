"""Distribution Matching Distillation as pure functions (Yin et al. 2024, DMD and DMD2).

Nothing here knows which network it drives: a ``Teacher`` (``teachers/base.py``) supplies the schedule,
the one-step generator, the real (teacher) and fake x0-denoisers, the noise, the conditions and the regression
distance. References are to docs/method.md sections and the DMD paper's equations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any


# ---------------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------------

def _per_sample_mean(v):
  return jnp.mean(v, axis=tuple(range(1, v.ndim)))


def dm_loss(x, real_x0, fake_x0):
  """Distribution-matching loss (docs/method.md §3, DMD Eq. 7–8), in float32.

  ``x`` is the generator output (with gradient); ``real_x0`` / ``fake_x0`` are the two denoisers'
  predictions at the noised ``x_t`` (no gradient). The KL gradient direction is
  ``grad = (p_real - p_fake) / mean|p_real|`` with ``p = x - mu(x_t)``; the loss
  ``0.5 * mean((x - sg(x - grad))^2)`` has ``d loss / d x = grad / numel(x)``.
  Returns ``(loss, grad)``.
  """
  x32 = x.astype(jnp.float32)
  xs = jax.lax.stop_gradient(x32)
  p_real = xs - jax.lax.stop_gradient(real_x0).astype(jnp.float32)
  p_fake = xs - jax.lax.stop_gradient(fake_x0).astype(jnp.float32)
  w = jnp.mean(jnp.abs(p_real), axis=tuple(range(1, x.ndim)), keepdims=True)
  grad = jnp.nan_to_num((p_real - p_fake) / w)
  loss = 0.5 * jnp.mean((x32 - jax.lax.stop_gradient(x32 - grad)) ** 2)
  return loss, grad


def distribution_matching_loss(nets, teacher_params, fake_params, x, cond, rng):
  """Noises the generated ``x`` at t ~ U[dm_t_min, dm_t_max] and evaluates ``dm_loss``."""
  r_t, r_eps = jax.random.split(rng)
  t = nets.schedule.sample_dm_t(r_t, x.shape[0])
  eps = jax.random.normal(r_eps, x.shape, jnp.float32)
  x_t = nets.schedule.add_noise(jax.lax.stop_gradient(x).astype(jnp.float32), eps, t)
  real_x0 = nets.real_denoise(teacher_params, x_t, t, cond)
  fake_x0 = nets.fake_denoise(fake_params, x_t, t, cond)
  loss, grad = dm_loss(x, real_x0, fake_x0)
  return loss, {"dm_loss": loss, "dm_grad_norm": jnp.sqrt(jnp.mean(jnp.sum(
      grad.reshape(grad.shape[0], -1) ** 2, axis=-1)))}


def fake_score_loss(nets, fake_params, x, cond, rng):
  """Denoising loss of the fake score on detached generator samples (docs/method.md §4).

  ``mean(lambda(t) (mu_fake(x_t, t) - x)^2)`` with t uniform over all timesteps; lambda(t) is EDM's
  ``1/sigma^2 + 1/sigma_data^2`` or, for VP schedules, SNR(t) (= epsilon-MSE).
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  r_t, r_eps = jax.random.split(rng)
  t = nets.schedule.sample_fake_t(r_t, x.shape[0])
  eps = jax.random.normal(r_eps, x.shape, jnp.float32)
  x_t = nets.schedule.add_noise(x, eps, t)
  pred = nets.fake_denoise(fake_params, x_t, t, cond).astype(jnp.float32)
  weight = nets.schedule.fake_loss_weight(t)
  return jnp.mean(weight * _per_sample_mean((pred - x) ** 2))


def l2_distance(params, x, y):
  """Per-sample Euclidean distance ``||x - y||_2`` (``params`` unused: the distances share one signature)."""
  d2 = jnp.sum(((x - y).astype(jnp.float32) ** 2).reshape(x.shape[0], -1), axis=-1)
  return jnp.sqrt(d2 + 1e-12)


def mse_distance(params, x, y):
  """Per-sample mean squared error."""
  return _per_sample_mean((x - y).astype(jnp.float32) ** 2)


REGRESSION_DISTANCES = {"l2": l2_distance, "mse": mse_distance}


def regression_loss(distance: Callable, frozen, x_pred, y):
  """``E[d(G(z), y)]`` over precomputed teacher ODE pairs (docs/method.md §5, DMD Eq. 9); ``distance(frozen, x, y)``
  is per-sample (L2, or LPIPS with its frozen VGG weights in ``frozen``)."""
  return jnp.mean(distance(frozen, x_pred, y))


# ---------------------------------------------------------------------------------------------------
# Optimisation (docs/method.md §6): AdamW per network, warm-up then constant (or cosine), clipping.
# ---------------------------------------------------------------------------------------------------

def learning_rate_schedule(lr: float, warmup_steps: int, decay: str = "constant", total_steps: int = 0):
  warm = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  if decay == "constant":
    rest = optax.constant_schedule(lr)
  elif decay == "cosine":
    rest = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {decay!r}")
  return optax.join_schedules([warm, rest], [warmup_steps])


# Leaves that are buffers in the reference code (never trained) but live in our parameter trees with a stopped
# gradient: NCSN++'s random Fourier frequencies (``map_noise/freqs``). Adam leaves them alone (zero gradient);
# weight decay must too.
BUFFER_LEAVES = ("freqs",)


def weight_decay_mask(params):
  """True where AdamW's decoupled weight decay applies: every leaf except the ``BUFFER_LEAVES``."""
  def decays(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) not in BUFFER_LEAVES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm, decay="constant",
                   total_steps=0) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(learning_rate_schedule(lr, warmup_steps, decay, total_steps),
                  b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask))


# ---------------------------------------------------------------------------------------------------
# Train steps.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DMDHyper:
  """Static hyper-parameters of one DMD iteration."""
  batch_size: int
  generator_optimizer: optax.GradientTransformation
  fake_score_optimizer: optax.GradientTransformation
  dm_weight: float = 1.0
  regression_weight: float = 0.0
  fake_updates_per_generator_update: int = 1   # 1 = DMD; 5 or 10 = DMD2's two time-scale rule
  ema_decay: float = 0.0                       # 0 = no EMA of the generator
  constrain_batch: Callable = lambda x: x      # sharding constraint for per-sample arrays


def init_state(nets, hyper: DMDHyper, generator_params, fake_params) -> dict:
  gen = {"params": generator_params,
         "opt_state": hyper.generator_optimizer.init(generator_params)}
  if hyper.ema_decay > 0:
    gen["ema_params"] = jax.tree.map(jnp.copy, generator_params)
  return {"step": jnp.zeros((), jnp.int32),
          "generator": gen,
          "fake_score": {"params": fake_params,
                         "opt_state": hyper.fake_score_optimizer.init(fake_params)}}


def generator_loss(gen_params, nets, hyper: DMDHyper, frozen, fake_params, z, cond, batch, rng):
  """``L_G = dm_weight L_DM + regression_weight L_reg`` (DMD Eq. 10). Returns ``(loss, (x, metrics))``."""
  x = nets.generate(gen_params, z, cond)
  loss, metrics = distribution_matching_loss(nets, frozen["teacher"], fake_params, x, cond, rng)
  loss = hyper.dm_weight * loss
  if hyper.regression_weight > 0:
    x_reg = nets.generate(gen_params, batch["reg_z"], batch["reg_cond"])
    reg = regression_loss(nets.regression_distance, frozen, x_reg, batch["reg_x"])
    metrics["regression_loss"] = reg
    loss = loss + hyper.regression_weight * reg
  metrics["generator_loss"] = loss
  return loss, (x, metrics)


def _adam_update(optimizer, params, opt_state, grads):
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def generator_update(gen_state, nets, hyper, frozen, fake_params, z, cond, batch, rng):
  """One optimiser step of the generator. Returns ``(gen_state, x, metrics)`` (x before the update)."""
  (_, (x, metrics)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
      gen_state["params"], nets, hyper, frozen, fake_params, z, cond, batch, rng)
  metrics["generator_grad_norm"] = optax.global_norm(grads)
  params, opt_state = _adam_update(hyper.generator_optimizer, gen_state["params"],
                                   gen_state["opt_state"], grads)
  new = {"params": params, "opt_state": opt_state}
  if "ema_params" in gen_state:
    d = hyper.ema_decay
    new["ema_params"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, gen_state["ema_params"], params)
  return new, x, metrics


def fake_score_update(fake_state, nets, hyper, x, cond, rng):
  """One optimiser step of the fake score on detached generator samples."""
  loss, grads = jax.value_and_grad(fake_score_loss, argnums=1)(nets, fake_state["params"], x, cond, rng)
  params, opt_state = _adam_update(hyper.fake_score_optimizer, fake_state["params"],
                                   fake_state["opt_state"], grads)
  return ({"params": params, "opt_state": opt_state},
          {"fake_score_loss": loss, "fake_score_grad_norm": optax.global_norm(grads)})


def train_step(state, frozen, batch, key, *, nets, hyper: DMDHyper):
  """One DMD iteration: a generator update every N-th step, a fake-score update every step.

  ``state`` is ``init_state``'s pytree, ``frozen`` holds the frozen networks' parameters
  (``'teacher'``, ...), ``batch`` the per-step data (regression pairs; the conditions when they come from a
  host-side table), ``key`` the ``'train'`` stream's key: the step's randomness is ``fold_in(key, step)``, so a
  resumed run repeats it exactly.
  """
  step = state["step"]
  rng = jax.random.fold_in(key, step)
  r_z, r_c, r_dm, r_fake = jax.random.split(rng, 4)
  z = hyper.constrain_batch(nets.sample_noise(r_z, hyper.batch_size))
  cond = hyper.constrain_batch(batch["cond"] if "cond" in batch else nets.conditions.draw(r_c, hyper.batch_size))

  def with_update(gen_state):
    return generator_update(gen_state, nets, hyper, frozen, state["fake_score"]["params"], z, cond,
                            batch, r_dm)

  def without_update(gen_state):
    x = nets.generate(gen_state["params"], z, cond)
    metrics = jax.eval_shape(with_update, gen_state)[2]
    return gen_state, x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics)

  n = hyper.fake_updates_per_generator_update
  if n == 1:
    gen_state, x, gen_metrics = with_update(state["generator"])
  else:
    gen_state, x, gen_metrics = jax.lax.cond(step % n == 0, with_update, without_update,
                                             state["generator"])
  fake_state, fake_metrics = fake_score_update(state["fake_score"], nets, hyper,
                                               jax.lax.stop_gradient(x), cond, r_fake)
  new_state = {"step": step + 1, "generator": gen_state, "fake_score": fake_state}
  return new_state, {**gen_metrics, **fake_metrics}
