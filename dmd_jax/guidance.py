"""Classifier-free guidance (Ho & Salimans 2022), the one definition used by the guided real score
(``families/sd/teacher.py``) and the guided teacher samplers (``samplers.py``); docs/method.md §3 and §5."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def unguided(uncond, guidance_scale) -> bool:
  """True when guidance reduces to the plain conditional prediction: no unconditional input, or a (static)
  scale of exactly 1."""
  return uncond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0)


def classifier_free_guidance(eps_fn: Callable, x_t, t, cond, uncond, guidance_scale):
  """``eps_u + g (eps_c - eps_u)`` in float32 from one batched ``eps_fn(x, t, c)`` call on ``[uncond; cond]``
  rows (unconditional first). ``t``: int timesteps [N]; ``uncond`` broadcast to ``cond`` (e.g. the empty
  prompt's embedding [1, L, D]); ``g`` a Python number or a traced scalar. When :func:`unguided`, one call on
  ``cond`` alone."""
  if unguided(uncond, guidance_scale):
    return eps_fn(x_t, t, cond).astype(jnp.float32)
  n = x_t.shape[0]
  uncond = jnp.broadcast_to(jnp.asarray(uncond, cond.dtype), cond.shape)
  eps = eps_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0),
               jnp.concatenate([uncond, cond], axis=0)).astype(jnp.float32)
  eps_u, eps_c = eps[:n], eps[n:]
  return eps_u + jnp.float32(guidance_scale) * (eps_c - eps_u)
