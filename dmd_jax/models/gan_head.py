"""DMD2's GAN classifier heads on the fake score's bottleneck features (docs/method.md §7).

:class:`ConvGANHead` is the official head of the EDM and Stable Diffusion runs, on NHWC features
(ImageNet-64 ADM: the encoder output 768 × 8 × 8; SD 1.5: the UNet mid-block output 1280 × 8 × 8)::

    conv 4×4 stride 2 pad 1 → GroupNorm(32, eps 1e-5) → SiLU → conv 4×4 stride 4 → GroupNorm(32) → SiLU
    → conv 1×1 → one logit

and of the SDXL runs on the mid-block output 1280 × 32 × 32 (tianweiy/DMD2 main/sd_guidance.py,
``cls_pred_branch`` with ``args.sdxl``): three stride-2 convs (32 → 16 → 8 → 4), each followed by GroupNorm +
SiLU, then the same stride-4 conv, GroupNorm, SiLU and 1×1 conv. In general a bottleneck of side 8·2^k gets
1 + k stride-2 convs before the stride-4 one.

Features are cast to float32 first; every conv keeps the feature width (the last maps it to one channel) and
is initialised like PyTorch's ``nn.Conv2d`` (weights and biases uniform in ``±1/sqrt(fan_in)``, which is what
its kaiming-uniform with ``a = sqrt(5)`` amounts to). Bottlenecks other than 8 × 8 (the ``:tiny`` configs, other
resolutions): the second conv's kernel and stride are ``min(4, side)`` of its input, and a map larger than 1 × 1
at the end is averaged into one logit.

Group count (:func:`head_groups`): the official 32 groups where every group then has at least 4 channels (≥ 128
channels: ImageNet's 768, SD's 1280, CIFAR's 256 unchanged), else ``C // 4`` groups (EDM's own GroupNorm rule,
``min(32, C // 4)``). The second GroupNorm sees a 1 × 1 map, so a group of g channels normalises g numbers: with
g = 2 every output is exactly ±1 whatever the input (the official head on the digits' 32-channel bottleneck,
16 groups of 2), the head's logit is then nearly constant over samples and the generator's GAN gradient
vanishes for most of them (tests/test_dmd2.py measures both). With g ≥ 4 the normalised values spread.

:class:`MLPGANHead` is the toy's head on the fake-score MLP's last hidden layer.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.models.layers import GroupNorm


def torch_default_init():
  """``(kernel_init, bias_init)`` of PyTorch's ``nn.Conv2d`` / ``nn.Linear``: uniform in ``±1/sqrt(fan_in)``."""
  kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

  def bias_init(fan_in):
    bound = 1.0 / jnp.sqrt(jnp.float32(fan_in))
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return kernel_init, bias_init


def _conv(features: int, kernel: int, stride: int, padding: int, fan_in: int, name: str) -> nn.Conv:
  kernel_init, bias_init = torch_default_init()
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                 kernel_init=kernel_init, bias_init=bias_init(fan_in), dtype=jnp.float32,
                 param_dtype=jnp.float32, name=name)


MIN_CHANNELS_PER_GROUP = 4


def head_groups(channels: int, num_groups: int = 32) -> int:
  """The head's GroupNorm group count: ``num_groups`` (official), lowered until every group has at least
  ``MIN_CHANNELS_PER_GROUP`` channels (and divides ``channels``); 1 for features narrower than that."""
  g = max(min(num_groups, channels // MIN_CHANNELS_PER_GROUP), 1)
  while channels % g:
    g -= 1
  return g


class ConvGANHead(nn.Module):
  """NHWC features ``[N, H, W, C]`` (H = W ≥ 4) → logits ``[N]`` float32. Parameter names follow the
  official ``nn.Sequential`` indices (8 × 8: ``conv0``, ``norm1``, ``conv3``, ``norm4``, ``conv6``; 32 × 32:
  ``conv0`` … ``norm10``, ``conv12``). ``groups`` > 0 overrides :func:`head_groups` (diagnostics); the last
  GroupNorm's output (on the 1 × 1 map) is sown as ``intermediates/norm4_out`` (read with
  ``mutable=['intermediates']``)."""
  num_groups: int = 32
  groups: int = 0

  @nn.compact
  def __call__(self, features):
    x = jnp.asarray(features, jnp.float32)
    if x.ndim != 4 or x.shape[1] < 4 or x.shape[2] < 4:
      raise ValueError(f"ConvGANHead needs NHWC features of at least 4 × 4, got shape {x.shape}")
    c = x.shape[-1]
    groups = self.groups or head_groups(c, self.num_groups)
    side, i = min(x.shape[1], x.shape[2]), 0
    while True:   # stride-2 convs down to 4 × 4 (one for an 8 × 8 bottleneck, three for SDXL's 32 × 32)
      x = _conv(c, 4, 2, 1, c * 16, f"conv{i}")(x)
      x = nn.silu(GroupNorm(groups, 1e-5, name=f"norm{i + 1}")(x))
      i, side = i + 3, side // 2
      if side <= 4:
        break
    k = min(4, x.shape[1], x.shape[2])
    x = _conv(c, k, k, 0, c * k * k, f"conv{i}")(x)
    x = GroupNorm(groups, 1e-5, name=f"norm{i + 1}")(x)
    self.sow("intermediates", "norm4_out", x)
    x = nn.silu(x)
    x = _conv(1, 1, 1, 0, c, f"conv{i + 3}")(x)
    return jnp.mean(x, axis=(1, 2, 3))


class MLPGANHead(nn.Module):
  """Toy head: features ``[N, D]`` → ``Dense(hidden) → SiLU → Dense(1)`` → logits ``[N]`` (PyTorch init)."""
  hidden: int = 128

  @nn.compact
  def __call__(self, features):
    x = jnp.asarray(features, jnp.float32)
    kernel_init, bias_init = torch_default_init()
    x = nn.silu(nn.Dense(self.hidden, kernel_init=kernel_init, bias_init=bias_init(x.shape[-1]), name="dense0")(x))
    return nn.Dense(1, kernel_init=kernel_init, bias_init=bias_init(self.hidden), name="dense1")(x)[:, 0]
