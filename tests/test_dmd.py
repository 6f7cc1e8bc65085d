"""The method's pure functions: DM loss, fake-score loss, schedules, the analytic teacher, the Heun sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmd_jax import dmd, schedules
from dmd_jax.families.toy.teacher import edm_precond, gaussian_mixture_denoiser
from dmd_jax.samplers import edm_heun_sample, heun_sigmas


def test_dm_loss_gradient_is_grad_over_numel():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 3, 5, 5)), jnp.float32)
  real = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  fake = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  (loss, grad), dx = jax.value_and_grad(dmd.dm_loss, has_aux=True)(x, real, fake)
  p_real, p_fake = np.asarray(x - real), np.asarray(x - fake)
  w = np.abs(p_real).mean(axis=(1, 2, 3), keepdims=True)
  expected = (p_real - p_fake) / w
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, expected / x.size, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(loss, 0.5 * np.mean(expected ** 2), rtol=1e-5)


def test_dm_loss_direction_and_nan_to_num():
  x = jnp.zeros((2, 2))
  # fake predicts x itself (p_fake = 0), real predicts +1: grad = p_real / |p_real| = -1 -> descent moves x up
  _, grad = dmd.dm_loss(x, jnp.ones((2, 2)), jnp.zeros((2, 2)))
  np.testing.assert_allclose(grad, -np.ones((2, 2)))
  # p_real == p_fake == 0: 0/0 is turned into 0 (torch.nan_to_num semantics), not NaN
  loss, grad = dmd.dm_loss(x, jnp.zeros((2, 2)), jnp.zeros((2, 2)))
  assert np.all(np.asarray(grad) == 0) and float(loss) == 0.0


def test_karras_grid_and_dm_range():
  s = schedules.EDMSchedule()
  sig = s.sigmas
  assert sig.shape == (1000,) and np.all(np.diff(sig) > 0)
  np.testing.assert_allclose([sig[0], sig[999]], [0.002, 80.0], rtol=1e-12)
  np.testing.assert_allclose([sig[20], sig[980]], [0.00323, 72.05], rtol=2e-3)
  t = np.asarray(s.sample_dm_t(jax.random.PRNGKey(0), 100_000))
  assert t.min() == 20 and t.max() == 980
  assert abs(np.mean(t) - 500) < 3   # uniform over indices, not over sigma
  t = np.asarray(s.sample_fake_t(jax.random.PRNGKey(1), 100_000))
  assert t.min() == 0 and t.max() == 999
  np.testing.assert_allclose(s.fake_loss_weight(jnp.array([999])), 1 / 80.0 ** 2 + 4.0, rtol=1e-6)


def test_vp_schedule_conversions():
  s = schedules.VPSchedule()
  abar = s.alphas_cumprod
  np.testing.assert_allclose(abar[999], 0.0047, rtol=2e-2)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  t = jnp.array([0, 500, 999])
  x_t = s.add_noise(x0, eps, t)
  np.testing.assert_allclose(s.eps_to_x0(x_t, eps, t), x0, atol=2e-5)
  np.testing.assert_allclose(s.x0_to_eps(x_t, x0, t), eps, atol=2e-5)


def test_mixture_denoiser_matches_monte_carlo():
  weights, means, std = [0.2, 0.5, 0.3], [[1.0, 0.0], [-0.5, 0.8], [0.0, -1.0]], 0.1
  D = gaussian_mixture_denoiser(weights, means, std)
  rng = np.random.default_rng(0)
  n = 400_000
  k = rng.choice(3, size=n, p=weights)
  x0 = np.asarray(means)[k] + std * rng.normal(size=(n, 2))
  for sigma, x in [(0.05, [0.95, 0.05]), (0.5, [0.2, 0.3]), (2.0, [-1.0, 1.5])]:
    # E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2), x0_i ~ data
    logw = -np.sum((np.asarray(x) - x0) ** 2, axis=1) / (2 * sigma ** 2)
    w = np.exp(logw - logw.max())
    mc = (w[:, None] * x0).sum(0) / w.sum()
    ess = w.sum() ** 2 / (w ** 2).sum()
    got = np.asarray(D(jnp.asarray([x], jnp.float32), sigma))[0]
    assert ess > 1000
    np.testing.assert_allclose(got, mc, atol=5e-3)


def test_heun_matches_exact_ode_for_a_gaussian():
  m, s = 0.3, 0.5
  D = lambda x, sigma: m + s ** 2 / (s ** 2 + sigma ** 2) * (x - m)
  z = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  # probability-flow ODE: x(sigma) - m = (x(sigma0) - m) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))
  exact = m + (80.0 * np.asarray(z) - m) * np.sqrt(s ** 2 / (s ** 2 + 80.0 ** 2))
  errs = []
  for n in (18, 64, 256):
    x = np.asarray(jax.jit(lambda z: edm_heun_sample(D, z, n))(z))
    errs.append(np.abs(x - exact).max() / np.abs(exact).max())
  assert errs[0] < 6e-2 and errs[2] < 3e-4, errs
  assert errs[1] < errs[0] / 8, errs   # second order: ~ (64/18)^2 = 12x smaller (Euler would give ~3.5x)
  t = heun_sigmas(18)
  assert len(t) == 19 and t[0] == 80.0 and t[-1] == 0.0 and abs(t[-2] - 0.002) < 1e-12


def test_heun_nfe_is_2n_minus_1():
  calls = []

  def D(x, sigma):
    calls.append(1)
    return x * 0
  # scan traces the body once: count by unrolling through jax.make_jaxpr equations instead
  jaxpr = jax.make_jaxpr(lambda z: edm_heun_sample(D, z, 18))(jnp.zeros((1, 2)))
  scan = [e for e in jaxpr.eqns if e.primitive.name == "scan"][0]
  assert scan.params["length"] == 17 and len(calls) == 3   # 2 per scan step (17 steps) + 1 last Euler


def test_fake_score_loss_is_zero_for_the_exact_denoiser():
  """The fake-score loss at its optimum: on data from a single Gaussian, the exact denoiser's loss is the
  irreducible posterior variance, and a wrong denoiser's is larger."""
  s = schedules.EDMSchedule()

  class Nets:
    schedule = s
  m, std = 0.0, 0.5
  exact = lambda p, x_t, t, c: m + std ** 2 / (std ** 2 + _b(s.sigma(t), x_t) ** 2) * (x_t - m)
  wrong = lambda p, x_t, t, c: 0.9 * exact(p, x_t, t, c)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(20000, 2)) * std, jnp.float32)
  n1, n2 = Nets(), Nets()
  n1.fake_denoise, n2.fake_denoise = exact, wrong
  l_exact = float(dmd.fake_score_loss(n1, None, x, None, jax.random.PRNGKey(0)))
  l_wrong = float(dmd.fake_score_loss(n2, None, x, None, jax.random.PRNGKey(0)))
  # weighted posterior variance: (1/s^2 + 1/sd^2) * std^2 s^2 / (std^2 + s^2) = 1 when std = sigma_data
  np.testing.assert_allclose(l_exact, 1.0, rtol=3e-2)
  assert l_wrong > 1.2 * l_exact


def _b(v, x):
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


def test_edm_precond_coefficients():
  D = edm_precond(lambda p, x_in, c_noise, cond: jnp.zeros_like(x_in), sigma_data=0.5)
  x = jnp.ones((2, 3))
  # F = 0 -> D = c_skip x = sd^2 / (sigma^2 + sd^2) x
  np.testing.assert_allclose(D(None, x, jnp.array([0.5, 2.0])),
                             np.array([[0.5], [0.25 / 4.25]]) * np.ones((2, 3)), rtol=1e-6)


def test_regression_distances():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  y = jnp.zeros((2, 2))
  np.testing.assert_allclose(dmd.l2_distance(None, x, y), [5.0, 1e-6], atol=1e-6)
  np.testing.assert_allclose(dmd.mse_distance(None, x, y), [12.5, 0.0])


def test_weight_decay_spares_buffers():
  """NCSN++'s Fourier frequencies (a buffer in PyTorch, stop-gradient here) keep their values under AdamW;
  ordinary weights decay."""
  params = {"model": {"map_noise": {"freqs": jnp.full((4,), 3.0)}, "dense": {"kernel": jnp.full((2, 2), 3.0)}}}
  opt = dmd.make_optimizer(0.9, 0.999, 1e-8, 0.5, 10.0)
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  p = params
  for _ in range(5):
    p, state = dmd.apply_update(opt, p, state, zeros, 1e-2)
  np.testing.assert_array_equal(p["model"]["map_noise"]["freqs"], params["model"]["map_noise"]["freqs"])
  assert float(p["model"]["dense"]["kernel"][0, 0]) < 3.0 - 1e-3
