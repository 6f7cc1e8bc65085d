"""Multi-head scaled dot-product attention: the one function behind every network's attention (the UNet's
self / cross attention, the VAE mid-block, CLIP, the EDM U-Nets).

The kernel is chosen per call by ``impl`` (a module attribute ``attention`` passed down from each network):

- ``'auto'``: cuDNN's fused flash attention for bfloat16 / float16 activations on a GPU when it takes the
  shapes (head width a multiple of 8, at most 256 on Hopper; SD 1.5's 40 / 80 / 160 are), else XLA's
  einsum-softmax-einsum;
- ``'xla'``: always the latter;
- ``'cudnn'``: always the former; an error where there is no cuDNN (e.g. on a CPU) or it rejects the shapes.

Float32 activations and masked attention always take the XLA path. Upcast attention (float32 q·k) takes it
under ``'auto'``; ``'cudnn'`` fuses it too: bfloat16 / float16 values are exact in float32 and the kernel
accumulates q·k and computes the softmax in float32, the same arithmetic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def check_implementation(impl: str) -> str:
  """Returns ``impl``; ``ValueError`` naming it unless it is one of :data:`IMPLEMENTATIONS`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return impl


def _fused(q, k, v, scale: float, upcast: bool, mask, impl: str):
  """cuDNN flash attention on ``[B, N, H, d]`` (float32 accumulation and softmax inside the kernel), or None
  for the XLA path."""
  if impl == "xla" or mask is not None or q.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  if impl == "auto" and (upcast or jax.default_backend() != "gpu"):
    return None
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise RuntimeError(f"attention='cudnn' needs cuDNN on a GPU, but JAX's backend is "
                       f"{jax.default_backend()!r}; use attention='auto' or 'xla'")
  try:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError):
    if impl == "cudnn":
      raise
    return None


def dot_product_attention(q, k, v, heads: int, *, upcast: bool = False, mask=None, impl: str = "auto"):
  """Multi-head attention on ``[B, N, heads*d]`` queries and ``[B, M, heads*d]`` keys / values → ``[B, N,
  heads*d]`` in ``v``'s dtype. Logits (scale ``d**-0.5``) and softmax are float32, the probabilities are cast
  to ``v``'s dtype before the product with ``v``.

  ``upcast`` (diffusers' ``upcast_attention``, EDM's float32 attention) also computes q·k from float32
  inputs; ``mask`` is added to the logits (broadcast to ``[B, heads, N, M]``). ``impl``: the kernel, see
  the module docstring.
  """
  check_implementation(impl)
  b, n, inner = q.shape
  if inner % heads:
    raise ValueError(f"attention: width {inner} is not divisible into {heads} heads")
  d = inner // heads
  q = q.reshape(b, n, heads, d)
  k = k.reshape(b, k.shape[1], heads, d)
  v = v.reshape(b, v.shape[1], heads, d)
  fused = _fused(q, k, v, d ** -0.5, upcast, mask, impl)
  if fused is not None:
    return fused.reshape(b, n, inner)
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
  if mask is not None:
    logits = logits + mask
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, inner)
