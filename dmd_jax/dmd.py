"""Distribution Matching Distillation as pure functions (Yin et al. 2024, DMD and DMD2).

Nothing here knows which network it drives: a ``Teacher`` (``families/base.py``) supplies the schedule,
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


def trainable_is_network(params, frozen):
  """The default of ``DMDHyper.generator_network`` / ``fake_network``: the trainable parameters are the network's."""
  del frozen
  return params


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


def distribution_matching_loss(teacher, teacher_params, fake_params, x, cond, rng):
  """Noises the generated ``x`` at t ~ U[dm_t_min, dm_t_max] and evaluates ``dm_loss``. The metrics name the
  normalised gradient ``grad`` (docs/method.md §3): ``dm_grad_batch_norm`` is ``||grad||`` over the whole global
  batch (the official code's ``dmtrain_gradient_norm``, which it takes over one GPU's batch), and
  ``dm_grad_sample_rms`` the root mean square over samples of each sample's ``||grad_i||``
  (``dm_grad_batch_norm / sqrt(batch)``)."""
  r_t, r_eps = jax.random.split(rng)
  t = teacher.schedule.sample_dm_t(r_t, x.shape[0])
  eps = jax.random.normal(r_eps, x.shape, jnp.float32)
  x_t = teacher.schedule.add_noise(jax.lax.stop_gradient(x).astype(jnp.float32), eps, t)
  real_x0 = teacher.real_denoise(teacher_params, x_t, t, cond)
  fake_x0 = teacher.fake_denoise(fake_params, x_t, t, cond)
  loss, grad = dm_loss(x, real_x0, fake_x0)
  sq = jnp.sum(grad.reshape(grad.shape[0], -1) ** 2, axis=-1)
  return loss, {"dm_loss": loss, "dm_grad_batch_norm": jnp.sqrt(jnp.sum(sq)),
                "dm_grad_sample_rms": jnp.sqrt(jnp.mean(sq))}


def fake_score_loss(teacher, fake_params, x, cond, rng):
  """Denoising loss of the fake score on detached generator samples (docs/method.md §4).

  ``mean(lambda(t) (mu_fake(x_t, t) - x)^2)`` with t uniform over all timesteps; lambda(t) is EDM's
  ``1/sigma^2 + 1/sigma_data^2`` or, for VP schedules, SNR(t) (= epsilon-MSE).
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  r_t, r_eps = jax.random.split(rng)
  t = teacher.schedule.sample_fake_t(r_t, x.shape[0])
  eps = jax.random.normal(r_eps, x.shape, jnp.float32)
  x_t = teacher.schedule.add_noise(x, eps, t)
  pred = teacher.fake_denoise(fake_params, x_t, t, cond).astype(jnp.float32)
  weight = teacher.schedule.fake_loss_weight(t)
  return jnp.mean(weight * _per_sample_mean((pred - x) ** 2))


def gan_noise(teacher, x, rng, max_timestep: int = 0):
  """Diffusion-GAN noising (docs/method.md §7): each sample at its own t uniform over [0, ``max_timestep``) of the
  schedule's table (the official ``--diffusion_gan_max_timestep``; 0 = the whole range, ``num_timesteps``; 1 = t
  = 0 only, the official code without ``--diffusion_gan``). Returns ``(x_t, t)``."""
  r_t, r_eps = jax.random.split(rng)
  t = jax.random.randint(r_t, (x.shape[0],), 0, max_timestep or teacher.schedule.num_timesteps)
  eps = jax.random.normal(r_eps, x.shape, jnp.float32)
  return teacher.schedule.add_noise(x.astype(jnp.float32), eps, t), t


def critic_logits(teacher, critic_params, x, cond, rng, max_timestep: int = 0):
  """``D(F(x_t, t, cond))``: the GAN head on the fake network's bottleneck at a diffusion-GAN noising of ``x``
  (t below ``max_timestep``, :func:`gan_noise`)."""
  x_t, t = gan_noise(teacher, x, rng, max_timestep)
  return teacher.critic.logits(critic_params["head"], teacher.critic.features(critic_params["score"], x_t, t, cond))


def gan_generator_loss(teacher, critic_params, x, cond, rng, max_timestep: int = 0):
  """Non-saturating generator term ``mean softplus(-D(F(G(z), t)))`` (docs/method.md §7). The gradient flows
  through the fake network into ``x``; the critic's parameters are not updated by the generator step."""
  return jnp.mean(jax.nn.softplus(-critic_logits(teacher, critic_params, x, cond, rng, max_timestep)))


def gan_critic_loss(teacher, critic_params, fake_x, fake_cond, real_x, real_cond, rng, max_timestep: int = 0):
  """Critic term ``mean softplus(D(fake)) + mean softplus(-D(real))`` on detached inputs, each sample noised at
  its own t (docs/method.md §7; both halves go through the network as one batch). Returns ``(loss, metrics)``."""
  n = fake_x.shape[0]
  x = jnp.concatenate([jax.lax.stop_gradient(fake_x).astype(jnp.float32),
                       jax.lax.stop_gradient(real_x).astype(jnp.float32)])
  logits = critic_logits(teacher, critic_params, x, jnp.concatenate([fake_cond, real_cond.astype(fake_cond.dtype)]),
                         rng, max_timestep)
  fake, real = logits[:n], logits[n:]
  loss = jnp.mean(jax.nn.softplus(fake)) + jnp.mean(jax.nn.softplus(-real))
  return loss, {"gan_critic_loss": loss, "critic_logit_fake": jnp.mean(fake), "critic_logit_real": jnp.mean(real)}


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
# The generator: one step, or several with backward simulation (DMD2, docs/method.md §7).
# ---------------------------------------------------------------------------------------------------

def _renoise_steps(teacher, steps, params, x0, cond, noise: Callable, start, stop):
  """Steps ``start .. stop-1`` of a multi-step generator: re-noise the last x0 to ``t_j`` with **fresh** noise
  ``noise(j)`` and predict x0 again. ``stop`` may be traced (backward simulation)."""
  ts = jnp.asarray(steps, jnp.int32)

  def body(j, x):
    t = jnp.full((x.shape[0],), ts[j], jnp.int32)
    return teacher.generate_at(params, teacher.schedule.add_noise(x, noise(j), t), t, cond).astype(jnp.float32)

  return jax.lax.fori_loop(start, stop, body, x0.astype(jnp.float32))


def sample_generator(teacher, steps, params, z, cond, keys):
  """Samples of the generator: ``generate(z)``, then for each further timestep of ``steps`` re-noise to it with
  fresh noise and predict x0 (``max(1, len(steps))`` network evaluations; ``steps=()``: the one-step
  generator). ``keys`` [N]: sample i's fresh noise at step j is ``normal(fold_in(keys[i], j))``, so a sample
  does not depend on the others in its batch."""
  x = teacher.generate(params, z, cond)
  if len(steps) <= 1:
    return x
  noise = lambda j: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), z.shape[1:], jnp.float32))(keys)
  return _renoise_steps(teacher, steps, params, x, cond, noise, 1, len(steps))


def generator_forward(teacher, steps, params, z, cond, rng):
  """The generator output that is trained this iteration. One step: ``generate(z)``. Several steps (backward
  simulation, docs/method.md §7): draw one step index k (the same on every device and host: ``rng`` is
  replicated); without gradient, run the generator from fresh pure noise through steps 0..k−1; re-noise its
  last x0 to ``t_k`` with the training noise ``z`` (k = 0: ``z`` itself is the pure noise) and predict x0 at
  ``t_k``, with gradient. Returns ``(x, k)``."""
  if len(steps) <= 1:
    return teacher.generate(params, z, cond), jnp.zeros((), jnp.int32)
  r_k, r_z, r_sim = jax.random.split(rng, 3)
  k = jax.random.randint(r_k, (), 0, len(steps))
  frozen = jax.lax.stop_gradient(params)

  def from_noise():
    return teacher.generate(params, z, cond).astype(jnp.float32)

  def simulated():
    x0 = teacher.generate(frozen, jax.random.normal(r_z, z.shape, jnp.float32), cond)
    noise = lambda j: jax.random.normal(jax.random.fold_in(r_sim, j), z.shape, jnp.float32)
    x0 = jax.lax.stop_gradient(_renoise_steps(teacher, steps, frozen, x0, cond, noise, 1, k))
    t = jnp.full((z.shape[0],), jnp.asarray(steps, jnp.int32)[k], jnp.int32)
    return teacher.generate_at(params, teacher.schedule.add_noise(x0, z, t), t, cond).astype(jnp.float32)

  return jax.lax.cond(k == 0, from_noise, simulated), k


# ---------------------------------------------------------------------------------------------------
# Optimisation (docs/method.md §6): AdamW per network, warm-up then constant (or cosine), clipping.
# ---------------------------------------------------------------------------------------------------

def learning_rate_schedule(lr: float, warmup_steps: int, decay: str = "constant", total_steps: int = 0,
                           warmup_processes: int = 1) -> Callable:
  """``iteration -> learning rate``, the same clock for both networks (docs/method.md §6): a linear warm-up from 0,
  then constant (or cosine to 0 at ``total_steps``). The official code steps diffusers' ``constant_with_warmup``
  (``lr · min(1, s / warmup_steps)``) after **every iteration**, whether or not the generator was updated, and
  accelerate steps a prepared scheduler once per process, so ``s = iteration × processes``: with
  ``warmup_processes`` set to the official run's process count the warm-up ends after ``warmup_steps /
  warmup_processes`` iterations, as there (ImageNet-64: 500 / 7 ≈ 72)."""
  if decay not in ("constant", "cosine"):
    raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {decay!r}")
  if warmup_steps < 0 or warmup_processes < 1:
    raise ValueError(f"optim.warmup_steps must be >= 0 and optim.warmup_processes >= 1, got {warmup_steps} and "
                     f"{warmup_processes}")
  warm = warmup_steps / warmup_processes    # iterations
  rest = (optax.cosine_decay_schedule(lr, max(int(round(total_steps - warm)), 1)) if decay == "cosine"
          else optax.constant_schedule(lr))

  def schedule(iteration):
    i = jnp.asarray(iteration, jnp.float32)
    if warm == 0:
      return jnp.asarray(rest(i), jnp.float32)
    return jnp.where(i < warm, lr * i / warm, rest(jnp.maximum(i - warm, 0.0))).astype(jnp.float32)
  return schedule


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


def make_optimizer(b1, b2, eps, weight_decay, clip_norm) -> optax.GradientTransformation:
  """AdamW at learning rate 1 (clipping at ``clip_norm`` first): :func:`apply_update` scales its update by the
  iteration's learning rate, so the schedule runs on the iteration clock, not on the optimiser's own count."""
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale(-1.0))


def apply_update(optimizer, params, opt_state, grads, lr):
  """One optimiser step at learning rate ``lr``: ``params + lr · optimizer.update(grads)``. Returns
  ``(params, opt_state)``."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
  return optax.apply_updates(params, updates), opt_state


# ---------------------------------------------------------------------------------------------------
# Train steps.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DMDHyper:
  """Static hyper-parameters of one DMD iteration."""
  batch_size: int
  generator_optimizer: optax.GradientTransformation    # at learning rate 1 (make_optimizer)
  fake_score_optimizer: optax.GradientTransformation
  # ``iteration -> learning rate`` of both networks (learning_rate_schedule): the generator's update at iteration
  # i is taken at ``learning_rate(i)``, as the official code's per-iteration scheduler has it
  learning_rate: Callable = lambda iteration: 1.0
  dm_weight: float = 1.0
  regression_weight: float = 0.0
  fake_updates_per_generator_update: int = 1   # 1 = DMD; 5 or 10 = DMD2's two time-scale rule
  ema_decay: float = 0.0                       # 0 = no EMA of the generator
  constrain_batch: Callable = lambda x: x      # sharding constraint for per-sample arrays
  generator_steps: tuple = ()                  # DMD2 multi-step generator: t_0 > t_1 > ...; () = one step
  gan_generator_weight: float = 0.0            # DMD2 GAN terms (docs/method.md §7); both 0 = no critic head
  gan_critic_weight: float = 0.0
  gan_max_timestep: int = 0                    # GAN noise t in [0, this); 0 = the whole schedule (gan_noise)
  # ``(trainable parameters, frozen) -> the network's parameters``: the identity, or LoRA's base + adapters
  # (dmd_jax/lora.py), formed inside the step so that only the trainable part is differentiated and stored
  generator_network: Callable = trainable_is_network
  fake_network: Callable = trainable_is_network

  @property
  def gan(self) -> bool:
    """Whether the fake score carries the GAN head (its parameters are then ``{'score', 'head'}``)."""
    return self.gan_generator_weight > 0 or self.gan_critic_weight > 0


def score_params(hyper: DMDHyper, fake_params):
  """The fake score network's own trainable parameters within the fake-score state's ``params``."""
  return fake_params["score"] if hyper.gan else fake_params


def fake_networks(hyper: DMDHyper, frozen, fake_params):
  """``(score network's parameters, critic parameters)``: the fake score as its network takes it, and with the
  GAN head ``{'score': that, 'head': ...}`` for the critic (``None`` without a head)."""
  score = hyper.fake_network(score_params(hyper, fake_params), frozen)
  return score, ({"score": score, "head": fake_params["head"]} if hyper.gan else None)


def init_state(teacher, hyper: DMDHyper, generator_params, fake_params, rng) -> dict:
  """The train state: step, skip counters, generator (params, AdamW state, EMA) and fake score (params — with
  the GAN head under ``{'score', 'head'}`` when ``hyper.gan`` — and AdamW state). ``rng`` initialises the head."""
  gen = {"params": generator_params,
         "opt_state": hyper.generator_optimizer.init(generator_params)}
  if hyper.ema_decay > 0:
    gen["ema_params"] = jax.tree.map(jnp.copy, generator_params)
  if hyper.gan:
    fake_params = {"score": fake_params, "head": teacher.critic.init(rng)}
  zero = jnp.zeros((), jnp.int32)
  return {"step": zero, "skipped_steps": zero, "consecutive_skips": zero,
          "generator": gen,
          "fake_score": {"params": fake_params,
                         "opt_state": hyper.fake_score_optimizer.init(fake_params)}}


def _generator_keys(rng):
  """The keys of the generator's forward (multi-step) and its GAN term, beside the DM loss's ``rng`` (which
  the one-step DMD iteration has always used as it is)."""
  return jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)


def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def generator_update(gen_state, teacher, hyper, frozen, fake_params, z, cond, batch, rng, step):
  """One optimiser step of the generator on ``L_G = dm_weight L_DM + gan_generator_weight L_GAN +
  regression_weight L_reg`` (DMD Eq. 10, DMD2) at ``hyper.learning_rate(step)``. The generator's forward is
  differentiated once (``jax.vjp``): the DM and GAN terms are differentiated w.r.t. its output ``x`` and their
  sum pulled back, so each term's gradient w.r.t. ``x`` is logged at no extra cost (``dm_output_grad_norm``,
  ``gan_output_grad_norm``: L2 norms over the batch of the weighted terms' gradients; their ratio is what one
  watches while tuning the GAN weight). The regression term has its own inputs and its own backward.
  Returns ``(gen_state, x, metrics)`` (x before the update)."""
  r_dm, r_gen, r_gan = rng, *_generator_keys(rng)
  score, critic = fake_networks(hyper, frozen, fake_params)
  params = gen_state["params"]

  def forward(p):
    x, k = generator_forward(teacher, hyper.generator_steps, hyper.generator_network(p, frozen), z, cond, r_gen)
    return hyper.constrain_batch(x), k

  x, pullback, k = jax.vjp(forward, params, has_aux=True)
  (dm, metrics), g_dm = jax.value_and_grad(
      lambda x: distribution_matching_loss(teacher, frozen["teacher"], score, x, cond, r_dm), has_aux=True)(x)
  g_x = hyper.dm_weight * g_dm
  loss = hyper.dm_weight * dm
  metrics["dm_output_grad_norm"] = _norm(g_x)
  if len(hyper.generator_steps) > 1:
    metrics["generator_step_index"] = k
  if hyper.gan_generator_weight > 0:
    gan, g_gan = jax.value_and_grad(
        lambda x: gan_generator_loss(teacher, critic, x, cond, r_gan, hyper.gan_max_timestep))(x)
    g_gan = hyper.gan_generator_weight * g_gan
    metrics.update(gan_generator_loss=gan, gan_output_grad_norm=_norm(g_gan))
    dm_norm = metrics["dm_output_grad_norm"]   # exactly 0 while the fake score equals the teacher (the start)
    metrics["gan_dm_grad_ratio"] = jnp.where(dm_norm > 0, metrics["gan_output_grad_norm"] / jnp.where(
        dm_norm > 0, dm_norm, 1.0), 0.0)
    loss = loss + hyper.gan_generator_weight * gan
    g_x = g_x + g_gan
  (grads,) = pullback(g_x.astype(x.dtype))
  if hyper.regression_weight > 0:
    def regression(p):
      x_reg = teacher.generate(hyper.generator_network(p, frozen), batch["reg_z"], batch["reg_cond"])
      return regression_loss(teacher.regression_distance, frozen, x_reg, batch["reg_x"])
    reg, g_reg = jax.value_and_grad(regression)(params)
    grads = jax.tree.map(lambda a, b: a + hyper.regression_weight * b, grads, g_reg)
    metrics["regression_loss"] = reg
    loss = loss + hyper.regression_weight * reg
  lr = hyper.learning_rate(step)
  metrics.update(generator_loss=loss, generator_grad_norm=optax.tree.norm(grads), generator_lr=lr)
  params, opt_state = apply_update(hyper.generator_optimizer, params, gen_state["opt_state"], grads, lr)
  new = {"params": params, "opt_state": opt_state}
  if "ema_params" in gen_state:
    d = hyper.ema_decay
    new["ema_params"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, gen_state["ema_params"], params)
  return new, x, metrics


def fake_update_loss(fake_params, teacher, hyper: DMDHyper, frozen, x, cond, batch, rng):
  """The fake score's loss: the denoising loss on detached generator samples, plus ``gan_critic_weight`` times
  the GAN critic term against the real batch (``batch['real_x']``, ``batch['real_cond']``) when the head
  exists. Returns ``(loss, metrics)``."""
  score, critic = fake_networks(hyper, frozen, fake_params)
  loss = fake_score_loss(teacher, score, x, cond, rng)
  metrics = {"fake_score_loss": loss}
  if hyper.gan:
    gan, gan_metrics = gan_critic_loss(teacher, critic, x, cond, batch["real_x"], batch["real_cond"],
                                       jax.random.fold_in(rng, 1), hyper.gan_max_timestep)
    metrics.update(gan_metrics)
    loss = loss + hyper.gan_critic_weight * gan
  return loss, metrics


def fake_score_update(fake_state, teacher, hyper, frozen, x, cond, batch, rng, step):
  """One optimiser step of the fake score (and its GAN head) on detached generator samples, at
  ``hyper.learning_rate(step)``."""
  (_, metrics), grads = jax.value_and_grad(fake_update_loss, has_aux=True)(
      fake_state["params"], teacher, hyper, frozen, x, cond, batch, rng)
  lr = hyper.learning_rate(step)
  params, opt_state = apply_update(hyper.fake_score_optimizer, fake_state["params"], fake_state["opt_state"],
                                   grads, lr)
  return {"params": params, "opt_state": opt_state}, {**metrics, "fake_score_grad_norm": optax.tree.norm(grads),
                                                      "fake_lr": lr}


# The metrics of the generator update: zeros on the steps without one (two time-scale rule); the trainer logs
# them from the last step that had one.
GENERATOR_METRICS = ("dm_loss", "dm_grad_batch_norm", "dm_grad_sample_rms", "dm_output_grad_norm",
                     "regression_loss", "gan_generator_loss", "gan_output_grad_norm", "gan_dm_grad_ratio",
                     "generator_loss", "generator_grad_norm", "generator_lr", "generator_step_index")


def _no_generator_metrics(hyper: DMDHyper) -> dict:
  """Zeros in the structure ``generator_update``'s metrics have under ``hyper`` (float32 scalars, the step
  index int32), for the steps without a generator update; ``lax.cond`` rejects any mismatch when it traces."""
  names = ["dm_loss", "dm_grad_batch_norm", "dm_grad_sample_rms", "dm_output_grad_norm", "generator_loss",
           "generator_grad_norm", "generator_lr"]
  names += ["generator_step_index"] if len(hyper.generator_steps) > 1 else []
  names += ["gan_generator_loss", "gan_output_grad_norm", "gan_dm_grad_ratio"] if hyper.gan_generator_weight > 0 else []
  names += ["regression_loss"] if hyper.regression_weight > 0 else []
  return {k: jnp.zeros((), jnp.int32 if k == "generator_step_index" else jnp.float32) for k in names}


def train_step(state, frozen, batch, key, *, teacher, hyper: DMDHyper):
  """One DMD / DMD2 iteration: a generator update every N-th step (N = ``fake_updates_per_generator_update``),
  a fake-score (critic) update every step; a step with non-finite gradients changes nothing but the counters.

  ``state`` is ``init_state``'s pytree, ``frozen`` holds the frozen networks' parameters
  (``'teacher'``, ...), ``batch`` the per-step data (regression pairs; the conditions when they come from a
  host-side table; the real samples of the GAN critic), ``key`` the ``'train'`` stream's key: the step's randomness is ``fold_in(key, step)``, so a
  resumed run repeats it exactly.
  """
  step = state["step"]
  rng = jax.random.fold_in(key, step)
  r_z, r_c, r_dm, r_fake = jax.random.split(rng, 4)
  z = hyper.constrain_batch(teacher.sample_noise(r_z, hyper.batch_size))
  cond = hyper.constrain_batch(batch["cond"] if "cond" in batch else teacher.conditions.draw(r_c, hyper.batch_size))

  def with_update(gen_state):
    return generator_update(gen_state, teacher, hyper, frozen, state["fake_score"]["params"], z, cond,
                            batch, r_dm, step)

  def without_update(gen_state):
    x, _ = generator_forward(teacher, hyper.generator_steps, hyper.generator_network(gen_state["params"], frozen),
                             z, cond, _generator_keys(r_dm)[0])
    return gen_state, x, _no_generator_metrics(hyper)

  n = hyper.fake_updates_per_generator_update
  if n == 1:
    gen_state, x, gen_metrics = with_update(state["generator"])
  else:
    gen_state, x, gen_metrics = jax.lax.cond(step % n == 0, with_update, without_update,
                                             state["generator"])
  fake_state, fake_metrics = fake_score_update(state["fake_score"], teacher, hyper, frozen,
                                               jax.lax.stop_gradient(x), cond, batch, r_fake, step)
  # A step whose gradients are not finite is skipped: the networks and optimiser states stay as they were
  # (docs/method.md §7); the trainer stops after too many in a row.
  finite = jnp.isfinite(gen_metrics["generator_grad_norm"]) & jnp.isfinite(fake_metrics["fake_score_grad_norm"])
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  skipped = (~finite).astype(jnp.int32)
  new_state = {"step": step + 1,
               "skipped_steps": state["skipped_steps"] + skipped,
               "consecutive_skips": jnp.where(finite, 0, state["consecutive_skips"] + 1),
               "generator": keep(gen_state, state["generator"]),
               "fake_score": keep(fake_state, state["fake_score"])}
  return new_state, {**gen_metrics, **fake_metrics, "skipped_steps": new_state["skipped_steps"],
                     "consecutive_skips": new_state["consecutive_skips"]}


def generator_steps(steps, num_timesteps: int) -> tuple[int, ...]:
  """``generator.steps`` checked: () (one step), or strictly decreasing timesteps that start at the schedule's
  last one, ``num_timesteps - 1`` (the generator's own pure-noise level; docs/method.md §7)."""
  steps = tuple(int(t) for t in steps)
  if not steps:
    return ()
  last = num_timesteps - 1
  if steps[0] != last or any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 0:
    raise ValueError(f"generator.steps must be strictly decreasing timesteps in [0, {last}] starting at {last} "
                     f"(the generator's pure-noise level), got {steps}")
  return steps
