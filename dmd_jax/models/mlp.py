"""MLP networks of the 2-D toy problem: the one-step generator and the fake-score network F.

The fake score is used inside EDM preconditioning (``teachers.toy.edm_precond``): F sees ``c_in x`` and
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

  @nn.compact
  def __call__(self, h, return_features: bool = False):
    """``out``, or ``(out, last hidden layer)`` with ``return_features``."""
    for i, width in enumerate(self.hidden):
      h = nn.silu(nn.Dense(width, name=f"dense{i}")(h))
    out = nn.Dense(self.out_dim, name="out")(h)
    return (out, h) if return_features else out


def fourier_features(x, num: int, scale: float, seed: int = 0):
  """``[cos(2 pi x B), sin(2 pi x B)]`` with a fixed ``B ~ N(0, scale^2)`` of shape [dim, num]."""
  b = jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, (x.shape[-1], num)), jnp.float32)
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

  @nn.compact
  def __call__(self, x, c_noise, return_features: bool = False):
    feats = [x]
    if self.num_fourier:
      feats.append(fourier_features(x, self.num_fourier, self.fourier_scale, seed=1))
    half = self.noise_embed_dim // 2
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(100.0), half))
    arg = c_noise[:, None] * freqs[None]
    feats += [jnp.cos(arg), jnp.sin(arg)]
    return MLP(self.hidden, self.dim, name="mlp")(jnp.concatenate(feats, axis=-1), return_features)
