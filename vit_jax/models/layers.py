"""Layers the models share: GELU, stochastic depth, remat policies, the MLP block, the MAP head,
LayerScale, the patch embedding at another patch size (FlexiViT) and the position embedding
(learned, 2-D sine-cosine or none), whose learned table can
be resampled to another patch grid inside a jitted function (`vit_jax.models.resize.grid_operator`:
the checkpoint transfer's method as a matrix).

Parameter names are a file format (Google's released ViT checkpoints and big_vision):
`MlpBlock_*/{Dense_0, Dense_1}`, `MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0,
MlpBlock_0}`, `posembed_input/pos_embedding`; LayerScale (not in Google's layout) holds `scale` [D].
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import resize
from vit_jax.models.attention import MultiHeadDotProductAttention, rows

Dtype = Any

ACTIVATIONS = ('gelu', 'gelu_tanh')
POSEMBS = ('learned', 'sincos2d', 'none')
# How a learned position table is resampled to another grid: the checkpoint transfer's methods
# (`vit_jax.models.resize`), applied inside the jitted call as their operator matrices.
RESIZE_METHODS = resize.METHODS
LN_EPS = 1e-6


# What a block keeps for the backward pass when `remat` is on. 'full' (or True) and
# 'nothing_saveable' recompute everything from the block's input (least memory); 'dots_saveable'
# keeps every matmul output and recomputes only the cheap elementwise work (LayerNorm, GELU,
# softmax); 'dots_with_no_batch_dims_saveable' keeps only the weight matmuls' outputs, so the
# [T, T] attention logits are recomputed (memory linear in tokens, attention done twice).
REMAT_POLICIES = {
    'full': None,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block: type, remat: Union[bool, str, None], **kwargs: Any) -> type:
  """`block` as it runs under `remat`: False/None/'' unchanged (every activation stored), True or a
  `REMAT_POLICIES` name wrapped in `nn.remat` with that policy. kwargs go to `nn.remat`."""
  if not remat:
    return block
  name = 'full' if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r}: use False, True or one of {sorted(REMAT_POLICIES)}')
  return nn.remat(block, policy=REMAT_POLICIES[name], **kwargs)


def pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
  """An int or an (h, w) pair -> (h, w) ints (patch and window sizes of every model family)."""
  return (int(value), int(value)) if np.ndim(value) == 0 else (int(value[0]), int(value[1]))


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zero a residual branch per example with probability `rate` (a float or a
  traced scalar), rescale the rest. Every family's blocks use this one."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def gelu(x: jax.Array, act: str) -> jax.Array:
  """'gelu_tanh': the tanh approximation (Google's checkpoints, Flax's default); 'gelu': exact erf
  (timm, Hugging Face, PyTorch's nn.GELU).

  The exact form is x/2 (1 + erf(x/sqrt 2)), PyTorch's own formula. `jax.nn.gelu` writes it with
  erfc, which XLA:CPU expands into two rational approximations, an exp and a select: its forward
  took 2.8x as long as erf's on [4096, 256] (AMD EPYC), and a whole exact-GELU train step of a
  6-block width-128 ViT ran x0.85 against x0.99 with erf (tanh = 1). The two agree to 1e-6.
  """
  if act not in ACTIVATIONS:
    raise ValueError(f'act {act!r} is not one of {ACTIVATIONS}')
  if act == 'gelu_tanh':
    return nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class MlpBlock(nn.Module):
  """Dense_0 -> GELU (`act`) -> dropout -> Dense_1."""
  mlp_dim: int
  dropout_rate: float = 0.0
  act: str = 'gelu_tanh'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    shape = x.shape
    x = rows(x, self.dtype)
    x = gelu(dense(self.mlp_dim, 'Dense_0')(x), self.act)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(shape[-1], 'Dense_1')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic).reshape(shape)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision `MAPHead`): a learned probe attends to the tokens."""
  num_heads: int
  mlp_dim: int
  act: str = 'gelu_tanh'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, N, D] -> [B, D]."""
    b, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe, [b, 1, 1]).astype(x.dtype)
    x, _ = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.param_dtype,
                                        name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='MlpBlock_0')(y)
    return x[:, 0]


class ResizedPatchEmbedding(nn.Module):
  """The patch embedding `embedding` (nn.Conv's parameters `kernel` [ph, pw, C, D] and `bias` [D],
  its initialisers) applied at another patch size: the stored kernel is PI-resized inside the call
  (FlexiViT, `resize.pi_resize_kernel_jax` with `method`), so gradients reach it at its own size."""
  features: int
  stored_hw: tuple[int, int]
  method: str = 'linear'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
    """images [B, H, W, C] (H, W multiples of patch_hw) -> [B, H/ph, W/pw, D]."""
    shape = (*self.stored_hw, images.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    kernel = resize.pi_resize_kernel_jax(kernel, patch_hw, self.method).astype(self.dtype)
    x = jax.lax.conv_general_dilated(images.astype(self.dtype), kernel, tuple(patch_hw), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return x + bias.astype(self.dtype)


class LayerScale(nn.Module):
  """x * scale, a learned per-channel `scale` [D] starting at `init` (CaiT, DeiT III, DINOv2)."""
  init: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init), (x.shape[-1],),
                       self.param_dtype)
    return x * scale.astype(x.dtype)


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (MoCo v3 / big_vision), [1, h*w, width] float32.

  A quarter of the channels each hold sin(y), cos(y), sin(x), cos(x) at geometric frequencies.
  """
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, got {width}')
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum('m,d->md', y.flatten(), omega)
  x = np.einsum('m,d->md', x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds position embeddings to [B, prefix + h*w, D] tokens.

  `learned`: a parameter `pos_embedding` [1, table_prefix + th*tw, D] (N(0, 0.02) init): the paper's
  1-D table with rows for the first `table_prefix` prefix tokens (default: all of them; 0 is timm's
  `no_embed_class`, DeiT III's and DINOv2-with-registers': the prefix tokens get none), then the
  table's grid th x tw. That grid is `table_grid` when given, else the input's at initialisation;
  on a later call it is read back off the table (`table_grid`, or the input's grid when the row
  count fits it, else a square). An input grid other than the table's is refused unless `dynamic`,
  which resamples the grid rows to the input's inside the call with the checkpoint transfer's
  method `resize` ('bilinear' or 'bicubic', `vit_jax.models.resize`).
  `sincos2d`: fixed, computed at the input's grid, zero on prefix tokens. `none`: identity.
  """
  kind: str
  grid: tuple[int, int]
  num_prefix: int
  param_dtype: Dtype = jnp.float32
  table_prefix: Optional[int] = None
  table_grid: Optional[tuple[int, int]] = None
  dynamic: bool = False
  resize: str = 'bilinear'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, n, d = x.shape
    gh, gw = self.grid
    if n != self.num_prefix + gh * gw:
      raise ValueError(f'{n} tokens are not {self.num_prefix} prefix tokens and a {gh}x{gw} grid')
    if self.kind == 'none':
      return x
    if self.kind == 'sincos2d':
      pe = sincos_2d(gh, gw, d)
      pe = np.concatenate([np.zeros((1, self.num_prefix, d), np.float32), pe], axis=1)
      return x + jnp.asarray(pe, x.dtype)
    if self.kind != 'learned':
      raise ValueError(f'posemb {self.kind!r} is not one of {POSEMBS}')
    rows_prefix = self.num_prefix if self.table_prefix is None else self.table_prefix
    table_grid = self._table_grid(rows_prefix)
    shape = (1, rows_prefix + table_grid[0] * table_grid[1], d)
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    pe = pe.astype(x.dtype)
    if table_grid != (gh, gw):
      if not self.dynamic:
        raise ValueError(
            f'the input\'s {gh}x{gw} patch grid differs from the position table\'s '
            f'{table_grid[0]}x{table_grid[1]}: build the model for this image size (and resample '
            'the checkpoint), or set dynamic_img_size=True to resample the table at call time')
      if self.resize not in RESIZE_METHODS:
        raise ValueError(f'dynamic_resize {self.resize!r} is not one of {RESIZE_METHODS}')
      # The transfer method's operator ([gh*gw, th*tw], built once per shape at trace time).
      op = jnp.asarray(resize.grid_operator(table_grid, (gh, gw), self.resize))
      grid = jnp.matmul(op, pe[0, rows_prefix:].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST).astype(pe.dtype)
      pe = jnp.concatenate([pe[:, :rows_prefix], grid[None]], axis=1)
    skip = self.num_prefix - rows_prefix  # prefix tokens without a row of the table
    return jnp.concatenate([x[:, :skip], x[:, skip:] + pe], axis=1) if skip else x + pe

  def _table_grid(self, rows_prefix: int) -> tuple[int, int]:
    if rows_prefix > self.num_prefix:
      raise ValueError(f'table_prefix {rows_prefix} > the {self.num_prefix} prefix tokens')
    if self.table_grid is not None:
      return (int(self.table_grid[0]), int(self.table_grid[1]))
    if not self.has_variable('params', 'pos_embedding'):
      return tuple(self.grid)
    rows = self.get_variable('params', 'pos_embedding').shape[1] - rows_prefix
    if rows == self.grid[0] * self.grid[1]:
      return tuple(self.grid)
    side = math.isqrt(rows)
    if side * side != rows:
      raise ValueError(f'the position table holds {rows} grid rows, not the input\'s '
                       f'{self.grid[0]}x{self.grid[1]} grid nor a square one: give its grid '
                       '(posemb_grid)')
    return side, side
