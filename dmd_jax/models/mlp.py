"""MLP networks of the 2-D toy problem: the one-step generator and the fake-score network F.

The fake score is used inside EDM preconditioning (``families.toy.teacher.edm_precond``): F sees ``c_in x`` and
``c_noise = ln(sigma) / 4``. Random Fourier features of the input help it resolve sharp, narrow modes.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class MLP(nn.Module):
  hidden: Sequence[int]
  out_dim: int
  zero_out: bool = False       # the output layer starts at zero (a residual that starts as nothing)

  @nn.compact
  def __call__(self, h, return_features: bool = False):
    """``out``, or ``(out, last hidden layer)`` with ``return_features``."""
    for i, width in enumerate(self.hidden):
      h = nn.silu(nn.Dense(width, name=f"dense{i}")(h))
    init = nn.initializers.zeros if self.zero_out else nn.initializers.lecun_normal()
    out = nn.Dense(self.out_dim, kernel_init=init, name="out")(h)
    return (out, h) if return_features else out


def fourier_matrix(dim: int, num: int, scale: float, seed: int = 0) -> np.ndarray:
  """The fixed ``B ~ N(0, scale^2)`` [dim, num] of ``fourier_features`` (float32)."""
  return np.random.default_rng(seed).normal(0.0, scale, (dim, num)).astype(np.float32)


def noise_frequencies(noise_embed_dim: int) -> np.ndarray:
  """The frequencies f of ``ToyDenoiserNet``'s noise embedding ``[cos(c_noise f), sin(c_noise f)]``: from 1 to
  100, log-spaced, ``noise_embed_dim // 2`` of them (float32)."""
  return np.exp(np.linspace(0.0, np.log(100.0), noise_embed_dim // 2)).astype(np.float32)


def fourier_features(x, num: int, scale: float, seed: int = 0):
  """``[cos(2 pi x B), sin(2 pi x B)]`` with a fixed ``B ~ N(0, scale^2)`` of shape [dim, num]."""
  b = jnp.asarray(fourier_matrix(x.shape[-1], num, scale, seed))
  proj = 2.0 * jnp.pi * x @ b
  return jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=-1)


class ToyGenerator(nn.Module):
  """``G(z) -> x`` for z ~ N(0, I_2)."""
  hidden: Sequence[int] = (256, 256, 256)
  dim: int = 2

  @nn.compact
  def __call__(self, z):
    return MLP(self.hidden, self.dim, name="mlp")(z)


class ToyDenoiserNet(nn.Module):
  """The raw network ``F(c_in x, c_noise)`` of an EDM-preconditioned toy denoiser (the fake score; the
  generator too when it takes several steps). ``return_features`` also returns the last hidden layer (DMD2's
  GAN head input)."""
  hidden: Sequence[int] = (256, 256, 256)
  dim: int = 2
  num_fourier: int = 64        # random Fourier features of the input (0 = plain input)
  fourier_scale: float = 2.0
  noise_embed_dim: int = 32
  zero_out: bool = False       # see ``MLP.zero_out``

  @nn.compact
  def __call__(self, x, c_noise, return_features: bool = False):
    feats = [x]
    if self.num_fourier:
      feats.append(fourier_features(x, self.num_fourier, self.fourier_scale, seed=1))
    arg = c_noise[:, None] * jnp.asarray(noise_frequencies(self.noise_embed_dim))[None]
    feats += [jnp.cos(arg), jnp.sin(arg)]
    return MLP(self.hidden, self.dim, self.zero_out, name="mlp")(jnp.concatenate(feats, axis=-1),
                                                                 return_features)
