"""Multi-head scaled dot-product attention: the one function behind every network's attention (the UNet's
self / cross attention, the VAE mid-block, CLIP, the EDM U-Nets).

The kernel is chosen per call by ``impl`` (a module attribute ``attention`` passed down from each network):

- ``'xla'``: XLA's einsum-softmax-einsum (materialises the ``[B, heads, N, M]`` float32 logits);
- ``'cudnn'``: cuDNN's fused flash attention (``jax.nn.dot_product_attention(implementation='cudnn')``) for
  bfloat16 / float16 activations; an error where there is no cuDNN (e.g. on a CPU or a TPU) or it rejects
  the shapes;
- ``'splash'``: the Pallas TPU flash-attention kernel ("splash attention",
  ``jax.experimental.pallas.ops.tpu.splash_attention``): no logits in memory, float32 softmax and
  accumulation inside the kernel. On a TPU the compiled kernel; on a CPU the same kernel run by Pallas'
  interpreter (its grid becomes loops of XLA ops: about a second more to compile per call site, no faster
  than XLA's path; for parity tests, never chosen by ``'auto'``); on a GPU an error (use ``'cudnn'`` or
  ``'auto'``). It takes query and key lengths that are multiples of 128 (its blocks are
  512, 256 or 128 tokens) and no mask; anything else is a ``ValueError`` naming the shapes;
- ``'auto'``, per target platform (:func:`target_platform`):

  - GPU: ``'cudnn'`` for bfloat16 / float16 activations without upcast when cuDNN takes the shapes (head
    width a multiple of 8, at most 256 on Hopper; SD 1.5's 40 / 80 / 160 are), else ``'xla'``;
  - TPU: ``'splash'`` for unmasked self-attention over long sequences (``N == M >= 1024``, a multiple of
    128: SD's 64×64 = 4096 and 32×32 = 1024 latent tokens) where its placement is known (below), else
    ``'xla'`` (cross attention over CLIP's 77 tokens, short sequences, CLIP's causal mask);
  - CPU: ``'xla'``.

Float32 activations and masked attention always take the XLA path under ``'cudnn'`` / ``'auto'`` on a GPU.
Upcast attention (float32 q·k) takes it under ``'auto'`` on a GPU; ``'cudnn'`` fuses it too: bfloat16 /
float16 values are exact in float32 and the kernel accumulates q·k and computes the softmax in float32, the
same arithmetic. ``'splash'`` takes upcast attention with float32 q and k (its scale ``d**-0.5`` is applied
to q, in float32, before the kernel: bfloat16 q is rounded once more than on the XLA path).

The target platform is that of the mesh in scope (``with jax.set_mesh(mesh)`` around tracing / lowering:
the abstract mesh carries its devices' platform), else ``jax.default_backend()``: so a program lowered for
TPU devices (a deviceless TPU topology) by a CPU process gets the TPU kernel; lowered without the mesh in
scope it would get the CPU's interpreted kernel. XLA does not partition a Pallas TPU kernel over devices,
so splash is placed as follows:

- a mesh over several devices with the batch axes ``('data', 'fsdp')`` (:data:`dmd_jax.sharding.BATCH_AXES`)
  in scope: splash runs inside ``jax.shard_map`` over the whole mesh, the batch dimension split over those
  axes (replicated over any other). A batch that does not divide over them takes the XLA path under
  ``'auto'`` and is a ``ValueError`` under ``'splash'``; so is a multi-device mesh without those axes;
- a one-device mesh, or inside a ``shard_map`` (per-device arrays): the kernel is called as it is;
- no mesh in scope: called as it is when the process has one device; with several, the program's placement
  is unknown while tracing: ``'auto'`` takes the XLA path, ``'splash'`` calls the kernel as it is (right for a
  one-device program; a program over several devices fails to lower with JAX's "Mosaic kernels cannot be
  automatically partitioned"). Multi-device programs should be lowered under ``jax.set_mesh``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dmd_jax.sharding import BATCH_AXES, batch_shards_in_scope

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# 'auto' on a TPU takes splash for self-attention over at least this many tokens.
SPLASH_AUTO_MIN_SEQ = 1024
# Splash's block sizes, largest first: a sequence is cut into blocks of the largest that divides it (the
# kernel's key blocks must be multiples of 128 lanes).
SPLASH_BLOCKS = (512, 256, 128)


def check_implementation(impl: str) -> str:
  """Returns ``impl``; ``ValueError`` naming it unless it is one of :data:`IMPLEMENTATIONS`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return impl


def target_platform() -> str:
  """The platform the attention being traced will run on: ``'tpu'``, ``'gpu'`` or ``'cpu'``.

  That of the devices of the mesh in scope (``jax.set_mesh(mesh)``: its abstract mesh, which is what tracing
  sees, carries the platform of a concrete mesh's devices), else ``jax.default_backend()``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def _fused(q, k, v, scale: float, upcast: bool, mask, impl: str):
  """cuDNN flash attention on ``[B, N, H, d]`` (float32 accumulation and softmax inside the kernel), or None
  for the XLA path."""
  if impl not in ("auto", "cudnn") or mask is not None or q.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  platform = target_platform()
  if impl == "auto" and (upcast or platform != "gpu"):
    return None
  if impl == "cudnn" and platform != "gpu":
    raise RuntimeError(f"attention='cudnn' needs cuDNN on a GPU, but the target platform is {platform!r}; "
                       f"use attention='auto' or 'xla'" + (" (or 'splash' on a TPU)" if platform == "tpu" else ""))
  try:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  except (NotImplementedError, ValueError, RuntimeError):
    if impl == "cudnn":
      raise
    return None


def _splash_block(n: int) -> int | None:
  return next((b for b in SPLASH_BLOCKS if n % b == 0), None)


def _splash_placement(b: int, strict: bool) -> str | None:
  """How splash is called in the program being traced: ``'plain'`` (one device's arrays: no mesh and one
  device, a one-device mesh, or inside a ``shard_map``), ``'shard_map'`` (a mesh over several devices with the
  batch axes: the batch split over them), or None for the XLA path under ``'auto'`` (where ``'splash'``,
  ``strict``, raises or, with no mesh in scope, calls it as it is). XLA does not partition Mosaic kernels."""
  mesh, shards = batch_shards_in_scope()
  if mesh.empty:
    # No mesh: the program's devices are unknown while tracing; several devices → 'auto' keeps XLA's path.
    return "plain" if strict or jax.device_count() == 1 else None
  if mesh.manual_axes or mesh.size == 1:
    return "plain"
  if shards is None:
    if strict:
      raise ValueError(f"attention='splash' under a mesh of {mesh.size} devices needs its batch axes "
                       f"{BATCH_AXES} (the mesh has {mesh.axis_names}); use attention='auto' or 'xla'")
    return None
  if b % shards:
    if strict:
      raise ValueError(f"attention='splash': a batch of {b} does not split over the {shards} devices of the "
                       f"mesh axes {BATCH_AXES}; use attention='auto' or 'xla'")
    return None
  return "shard_map"


def _splash_kernel(heads: int, n: int, m: int, interpret: bool):
  """Splash attention on one example's ``[heads, n, d]`` queries and ``[heads, m, d]`` keys / values, no
  mask; block sizes from the shapes (forward and both backward kernels). Built afresh inside each trace (its
  mask tables become constants of the program; a cached kernel would hold one trace's values or arrays placed
  on the default backend's device)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bkv = _splash_block(n), _splash_block(m)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((n, m))] * heads)
  return sk.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def _splash(q, k, v, scale: float, upcast: bool, mask, impl: str):
  """Splash attention on ``[B, N, H, d]`` → ``[B, N, H, d]`` in ``v``'s dtype, or None for the other paths
  (``impl='auto'`` where the rule of the module docstring does not pick it)."""
  if impl not in ("auto", "splash"):
    return None
  b, n, heads, _ = q.shape
  m = k.shape[1]
  platform = target_platform()
  strict = impl == "splash"
  if not strict:
    if platform != "tpu" or mask is not None or n != m or n < SPLASH_AUTO_MIN_SEQ:
      return None
  elif platform not in ("tpu", "cpu"):
    raise RuntimeError(f"attention='splash' is the Pallas TPU kernel (interpreted on a CPU), but the target "
                       f"platform is {platform!r}; use attention='cudnn' or 'auto'")
  elif mask is not None:
    raise ValueError(f"attention='splash' takes no mask (q {tuple(q.shape)}, k {tuple(k.shape)} as [B, N, "
                     f"heads, d], mask {tuple(jnp.shape(mask))}); use attention='auto' or 'xla'")
  if _splash_block(n) is None or _splash_block(m) is None:
    if strict:
      raise ValueError(f"attention='splash' needs query and key lengths that are multiples of 128 (its blocks: "
                       f"{SPLASH_BLOCKS} tokens), got N={n}, M={m} (q {tuple(q.shape)}, k {tuple(k.shape)} as "
                       f"[B, N, heads, d]); use attention='auto' or 'xla'")
    return None
  placement = _splash_placement(b, strict)
  if placement is None:
    return None
  # The kernel has no softmax scale: scale q in float32, then back to the compute dtype (float32 for upcast).
  qk_dtype = jnp.float32 if upcast else q.dtype
  q = (q.astype(jnp.float32) * scale).astype(qk_dtype)
  k = k.astype(qk_dtype)
  heads_major = lambda a: jnp.swapaxes(a, 1, 2)          # [B, N, H, d] <-> [B, H, N, d]
  interpret = platform != "tpu"
  call = lambda q, k, v: jax.vmap(_splash_kernel(heads, n, m, interpret))(q, k, v)
  q, k, v = heads_major(q), heads_major(k), heads_major(v)
  if placement == "shard_map":
    # Over every mesh axis (XLA cannot partition the kernel over the others): the batch split over
    # BATCH_AXES, replicated over any other axis.
    spec = P(BATCH_AXES)
    call = jax.shard_map(call, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    if jax.sharding.get_abstract_mesh().explicit_axes:
      # Explicit sharding: the operands' types carry their sharding, which shard_map's in_specs must match.
      q, k, v = (jax.sharding.reshard(a, spec) for a in (q, k, v))
  out = call(q, k, v)
  return heads_major(out).astype(v.dtype)


def dot_product_attention(q, k, v, heads: int, *, upcast: bool = False, mask=None, impl: str = "auto"):
  """Multi-head attention on ``[B, N, heads*d]`` queries and ``[B, M, heads*d]`` keys / values → ``[B, N,
  heads*d]`` in ``v``'s dtype. Logits (scale ``d**-0.5``) and softmax are float32; the XLA path casts the
  probabilities to ``v``'s dtype before the product with ``v`` (splash keeps them float32).

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
  fused = _splash(q, k, v, d ** -0.5, upcast, mask, impl)
  if fused is None:
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
