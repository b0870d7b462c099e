"""The ResNet of the hybrid ViT (Dosovitskiy et al., 2021, §3.1), in Flax linen.

A ResNet with weight-standardised convolutions and GroupNorm (BiT, Kolesnikov et al., 2020), in the
non-pre-activation ("v1.5") form of Google's `models_resnet.py`:

    root:  conv_root 7x7 /2 -> gn_root -> ReLU -> max-pool 3x3 /2 ('SAME')
    unit:  y = ReLU(gn1(conv1 1x1 x)) -> ReLU(gn2(conv2 3x3 /s y)) -> gn3(conv3 1x1 y)
           out = ReLU(y + gn_proj(conv_proj 1x1 /s x))      (projection only when shape changes)

Stage i (1-based `block{i}`) has `layers[i-1]` units of `width * 2**(i-1)` middle channels and four
times that many output channels; the first stage keeps the resolution, later ones halve it in their
first unit's 3x3 conv (and its projection). Parameter paths are Google's, a file format:
`conv_root`, `gn_root`, `block{i}/unit{j}/{conv1,gn1,conv2,gn2,conv3,gn3,conv_proj,gn_proj}`.

Numerics follow timm's port of these models (`vision_transformer_hybrid.py`), which loads Google's
files: the kernel of every conv is standardised per output channel as (w - mean) / sqrt(var + 1e-8)
(timm's `StdConv2dSame(eps=1e-8)`; Google's own code divides by std + 1e-5, which differs by ~1e-5 /
std relative), convs and the max-pool pad TF-style 'SAME' (the extra row/column at the bottom/right),
and GroupNorm has 32 groups and eps 1e-5.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

WS_EPS = 1e-8
GN_EPS = 1e-5
GN_GROUPS = 32


def standardize_weight(kernel: jax.Array, eps: float = WS_EPS) -> jax.Array:
  """A conv kernel [kh, kw, in, out] with zero mean and unit (biased) variance per output channel."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Conv):
  """A convolution whose kernel is weight-standardised (in the parameter dtype) before use.

  The stored parameter is the raw kernel, as in Google's and timm's checkpoints.
  """
  ws_eps: float = WS_EPS

  def param(self, name: str, *args, **kwargs):  # pylint: disable=arguments-differ
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = standardize_weight(value, self.ws_eps)
    return value


def check_width(width: int) -> None:
  """Raises a ValueError unless every GroupNorm of the ResNet can split its channels in 32 groups."""
  if width <= 0 or width % GN_GROUPS:
    raise ValueError(f'resnet_width={width}: the ResNet\'s GroupNorms use {GN_GROUPS} groups, so the '
                     f'width (stem channels; stage i has width * 2**i middle channels) must be a '
                     f'positive multiple of {GN_GROUPS}, e.g. 32 or 64')


def group_norm(name: str, dtype: Dtype, param_dtype: Dtype, zero_scale: bool = False
               ) -> nn.GroupNorm:
  """The GroupNorm after every conv (32 groups, eps 1e-5, as timm's `GroupNormAct`)."""
  # Two-pass variance: the fast E[x^2] - E[x]^2 form loses digits when a channel's mean is large.
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=name)


class ResidualUnit(nn.Module):
  """Bottleneck unit: [B, H, W, C] -> [B, H/s, W/s, 4 * features]."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, kernel, strides, name: StdConv(
        features, (kernel, kernel), strides=(strides, strides), padding='SAME', use_bias=False,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name, zero_scale=False: group_norm(name, self.dtype, self.param_dtype, zero_scale)
    out = 4 * self.features
    residual = x
    if x.shape[-1] != out or self.strides != 1:
      residual = conv(out, 1, self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
    # Zero-initialised last scale: each unit starts as (ReLU of) its shortcut, as Google's.
    y = norm('gn3', zero_scale=True)(conv(out, 1, 1, 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units (`unit1` ... ), the first with stride `first_stride`."""
  block_size: int
  features: int
  first_stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.block_size):
      x = ResidualUnit(self.features, self.first_stride if j == 0 else 1, self.dtype,
                       self.param_dtype, name=f'unit{j + 1}')(x)
    return x


def feature_stride(layers: Sequence[int]) -> int:
  """Input pixels per feature-map pixel: 4 for the root, doubled by every stage after the first."""
  return 4 * 2 ** max(len(layers) - 1, 0)


def feature_channels(width: int, layers: Sequence[int]) -> int:
  """Channels of the ResNet's output: the root's width, or 4x the last stage's middle width."""
  return width if not layers else 4 * width * 2 ** (len(layers) - 1)


def resnet_features(x: jax.Array, *, width: int, layers: Sequence[int], dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32) -> list[jax.Array]:
  """Root and stages, created in the calling module's scope (call it inside an `nn.compact` method).

  The parameters then sit at the caller's top level, as in Google's hybrid checkpoints.

  Args:
    x: images [B, H, W, C] (any C).
    width: root channels (64 x the width factor); stage i (0-based) has width * 2**i middle channels.
    layers: units per stage; () builds the root only.

  Returns:
    the root's output [B, H/4, W/4, width] (after the max-pool) followed by each stage's output
    [B, H/s_i, W/s_i, 4 * width * 2**i] (sizes rounded up: 'SAME' padding).
  """
  check_width(width)
  x = StdConv(width, (7, 7), strides=(2, 2), padding='SAME', use_bias=False, dtype=dtype,
              param_dtype=param_dtype, name='conv_root')(x)
  x = nn.relu(group_norm('gn_root', dtype, param_dtype)(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  outputs = [x]
  for i, block_size in enumerate(layers):
    if block_size < 1:
      raise ValueError(f'resnet_layers={tuple(layers)}: every stage needs at least one unit')
    x = ResNetStage(block_size, width * 2 ** i, 1 if i == 0 else 2, dtype, param_dtype,
                    name=f'block{i + 1}')(x)
    outputs.append(x)
  return outputs


class ResNet(nn.Module):
  """The hybrid's ResNet on its own (same parameter names, at this module's top level).

  Called on images [B, H, W, C]; returns the last feature map [B, H/s, W/s, C_out] (see
  `feature_stride`, `feature_channels`), or all of them with `features=True`.
  """
  width: int = 64
  layers: Sequence[int] = (3, 4, 9)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, features: bool = False):
    outputs = resnet_features(images.astype(self.dtype), width=self.width, layers=self.layers,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    return outputs if features else outputs[-1]
