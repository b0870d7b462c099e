"""Swin Transformer (Liu et al., 2021, "Hierarchical Vision Transformer using Shifted Windows").

    x_0 = LN(PatchPartition(image))                       (p x p conv, `patch_embed` + `patch_norm`)
    stage s: x = PatchMerging(x) (s > 0), then depths[s] blocks alternating
      z' = z + W-MSA(LN(z)),  z'' = z' + MLP(LN(z'))      (even blocks: regular windows)
      z' = z + SW-MSA(LN(z)), z'' = z' + MLP(LN(z'))      (odd blocks: windows shifted by M // 2)
    y = head(mean_hw(LN(x)))

Attention is computed inside non-overlapping M x M windows with a learned relative position bias
(a [(2M-1)^2, heads] table per block, indexed by a fixed relative-position index). The computation
follows timm 1.0's `swin_transformer.py` so that converted weights give the same logits:
  - a stage whose feature map is no larger than the window shrinks the window to the map and does
    not shift (so Swin-T at 224 has 7 x 7 windows and no shift in its last stage);
  - a map the window does not divide is zero-padded at the bottom/right after the cyclic shift;
    the padded tokens take part in attention as keys, as in timm;
  - a map of odd height or width is zero-padded at the bottom/right before patch merging (timm), so
    any image size that the patch size divides runs (stage s: ceil(H / p / 2^s) rows);
  - the shifted-window mask adds -100 (not -inf) to logits between tokens of different regions;
  - patch merging (between stages, at the start of stages 1..S-1) concatenates the 2 x 2
    neighbours in the order (0,0), (1,0), (0,1), (1,1) (row, column) before LayerNorm and a
    bias-free 4C -> 2C projection.

The window geometry (stage maps, clamped windows and shifts, the relative-position index, the mask,
partitioning) is in `swin_windows.py`, re-exported here.

Parameter paths: `patch_embed` (conv), `patch_norm`, `stage_{s}/downsample/{norm,reduction}`,
`stage_{s}/block_{b}/{norm1, attn/{qkv, proj, relative_position_bias_table}, norm2, mlp/{fc1,fc2}}`,
`norm`, `head`. `qkv` is timm's fused projection with its output axes kept apart: kernel
[C, 3, heads, K] (q|k|v, head, head dim: timm's column order), bias [3, heads, K]; `proj` kernel
[heads, K, C]. The head axis is what tensor parallelism splits.

Any image size at call time: the windows and shifts are those of a model built at the input's size
(each stage's window clamped to its map, as above), so a call at another size equals building there.
Only where that clamping changes a stage's window does a bias table no longer fit; then
`dynamic_img_size=True` resamples the stored table to the new window inside the jitted function
(`dynamic_resize_method`, the checkpoint transfer's methods, `vit_jax.models.resize`), and False
refuses with the reason. (timm's own `dynamic_img_size` differs: it keeps the build-time windows and
shifts at every size; building timm at the new size, as its checkpoint filter does, is what this
equals.)

Backbone API (`vit_jax.models.backbone`): `intermediates=(s, ...)` indexes the stages and returns
each stage's output [B, h_s, w_s, C * 2^s]; `norm=True` applies the final `norm` to the last stage
only (it is sized for it; timm's `forward_intermediates` does the same); no prefix tokens.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import backbone
from vit_jax.models.attention import dot_product_attention
from vit_jax.models.resize import RELATIVE_RESIZE_METHODS, resize_relative_table, window_of_table
from vit_jax.models.swin_windows import (MASK_VALUE, relative_position_index,
                                         shifted_window_mask, stage_grids, stage_windows,
                                         window_partition, window_reverse)
from vit_jax.models.vit import ACTIVATIONS, drop_path, gelu, pair

__all__ = ['MASK_VALUE', 'PatchMerging', 'SwinBlock', 'SwinStage', 'SwinTransformer',
           'WindowAttention', 'check_fields', 'relative_position_index', 'shifted_window_mask',
           'stage_grids', 'stage_windows', 'window_partition', 'window_reverse']

Dtype = Any

LN_EPS = 1e-5  # PyTorch's LayerNorm default, which timm's Swin uses.
ACTS = ACTIVATIONS


def check_fields(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: Union[int, Sequence[int]], act: str = 'gelu',
                 dynamic_resize_method: str = 'bicubic') -> None:
  """Raises a ValueError naming the field when these sizes cannot build a Swin."""
  if dynamic_resize_method not in RELATIVE_RESIZE_METHODS:
    raise ValueError(f'dynamic_resize_method {dynamic_resize_method!r} is not one of '
                     f'{RELATIVE_RESIZE_METHODS}')
  if len(depths) != len(num_heads) or not len(depths):
    raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} must be non-empty '
                     'and of equal length (one entry per stage)')
  for s, heads in enumerate(num_heads):
    if (embed_dim * 2 ** s) % heads:
      raise ValueError(f'stage {s} width {embed_dim * 2 ** s} is not divisible by its {heads} '
                       'heads; choose embed_dim or num_heads so that it is')
  if min(pair(window_size)) < 1:
    raise ValueError(f'window_size must be positive, got {window_size}')
  _gelu(act)


def _gelu(act: str):
  if act not in ACTS:
    raise ValueError(f'act {act!r} is not one of {ACTS}')
  return lambda x: gelu(x, act)


_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows plus a relative position bias.

  Called with x [B*nW, N, C] (N = wh*ww tokens per window) and an optional mask [nW, N, N]. A stored
  bias table of another (square) window is resampled to this one when `dynamic_img_size`, else
  refused.
  """
  num_heads: int
  window: tuple[int, int]
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dynamic_img_size: bool = False
  dynamic_resize_method: str = 'bicubic'

  def bias_table(self) -> jax.Array:
    """[(2wh-1)(2ww-1), heads] float32: the stored table, resampled if it is of another window."""
    wh, ww = self.window
    rows = (2 * wh - 1) * (2 * ww - 1)
    name = 'relative_position_bias_table'
    # The stored table's own shape, so that one of another window is read (not a flax shape error).
    shape = (self.get_variable('params', name).shape if self.has_variable('params', name)
             else (rows, self.num_heads))
    table = self.param(name, _dense_init, shape, self.param_dtype).astype(jnp.float32)
    if shape[0] == rows:
      return table
    where = '/'.join(self.scope.path)
    if not self.dynamic_img_size:
      raise ValueError(
          f'{where}: the relative position bias table has {shape[0]} rows, but at this image size '
          f'the window is {wh}x{ww} ({rows} rows: a stage whose map is smaller than window_size '
          'uses the map as its window); call with the image size the model was built for, set '
          'dynamic_img_size=True to resample the tables in the call, or transfer the checkpoint to '
          'a model built at this size')
    try:
      old = window_of_table(shape[0])
    except ValueError as e:
      raise ValueError(f'{where}: cannot resample the bias table to a {wh}x{ww} window: {e}') from e
    return resize_relative_table(table, old, self.window, self.dynamic_resize_method)

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[np.ndarray], *, deterministic: bool = True):
    bw, n, c = x.shape
    heads = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init)
    qkv = nn.DenseGeneral((3, heads, c // heads), name='qkv', **kw)(x)  # [B*nW, N, 3, heads, K]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    index = relative_position_index(self.window).reshape(-1)
    bias = jnp.take(self.bias_table(), index, axis=0).reshape(n, n, heads)
    bias = bias.transpose(2, 0, 1)[None]  # [1, heads, N, N]
    if mask is not None:
      nw = mask.shape[0]
      # Windows are ordered image-major, so the per-window mask repeats over the batch.
      bias = bias + jnp.asarray(mask)[:, None]  # [nW, heads, N, N]
      bias = jnp.broadcast_to(bias[None], (bw // nw,) + bias.shape).reshape(bw, heads, n, n)
    rng = None
    if self.attention_dropout_rate > 0.0 and not deterministic:
      rng = self.make_rng('dropout')
    y, _ = dot_product_attention(q, k, v, implementation=self.attention_impl, bias=bias,
                                 dropout_rate=self.attention_dropout_rate, dropout_rng=rng,
                                 deterministic=deterministic)
    y = nn.DenseGeneral(c, axis=(-2, -1), name='proj', **kw)(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Mlp(nn.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's Mlp)."""
  hidden: int
  dropout_rate: float = 0.0
  act: str = 'gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init,
        name=name)
    y = _gelu(self.act)(dense(self.hidden, 'fc1')(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'fc2')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class SwinBlock(nn.Module):
  """Pre-LN (shifted-)window attention block on [B, H, W, C] maps."""
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int]
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  act: str = 'gelu'
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dynamic_img_size: bool = False
  dynamic_resize_method: str = 'bicubic'

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    b, h, w, c = x.shape
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    use_drop_path = self.drop_path_rate > 0.0 and not deterministic
    (wh, ww), (sh, sw) = self.window, self.shift

    y = norm('norm1')(x)
    if sh or sw:
      y = jnp.roll(y, (-sh, -sw), axis=(1, 2))
    ph, pw = (-h) % wh, (-w) % ww
    if ph or pw:
      y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
    mask = shifted_window_mask((h, w), self.window, self.shift)
    y = window_partition(y, self.window).reshape(-1, wh * ww, c)
    y = WindowAttention(self.num_heads, self.window, self.attention_dropout_rate, self.dropout_rate,
                        self.attention_impl, self.dtype, self.param_dtype, self.dynamic_img_size,
                        self.dynamic_resize_method, name='attn')(
                            y, mask, deterministic=deterministic)
    y = window_reverse(y.reshape(-1, wh, ww, c), self.window, h + ph, w + pw)[:, :h, :w]
    if sh or sw:
      y = jnp.roll(y, (sh, sw), axis=(1, 2))
    if use_drop_path:
      y = drop_path(y, jnp.float32(self.drop_path_rate), self.make_rng('dropout'))
    x = x + y

    y = Mlp(int(c * self.mlp_ratio), self.dropout_rate, self.act, self.dtype, self.param_dtype,
            name='mlp')(norm('norm2')(x), deterministic=deterministic)
    if use_drop_path:
      y = drop_path(y, jnp.float32(self.drop_path_rate), self.make_rng('dropout'))
    return x + y


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: 2x2 neighbours concatenated, LayerNorm,
  bias-free Dense. An odd map is zero-padded at the bottom/right first (timm)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[1] % 2 or x.shape[2] % 2:
      x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    b, h, w, c = x.shape
    # [B, H/2, 2(row), W/2, 2(col), C] -> [B, H/2, W/2, col, row, C]: timm's concatenation order.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(
        b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_dense_init, name='reduction')(x)


class SwinStage(nn.Module):
  """Optional `downsample` (PatchMerging) then `depth` blocks, odd ones shifted."""
  depth: int
  num_heads: int
  window_size: Union[int, tuple[int, int]]
  downsample: bool
  drop_path_rates: tuple[float, ...]
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  act: str = 'gelu'
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dynamic_img_size: bool = False
  dynamic_resize_method: str = 'bicubic'

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if self.downsample:
      x = PatchMerging(self.dtype, self.param_dtype, name='downsample')(x)
    window, shift = stage_windows(x.shape[1:3], self.window_size)
    for i in range(self.depth):
      x = SwinBlock(self.num_heads, window, shift if i % 2 else (0, 0), self.mlp_ratio,
                    float(self.drop_path_rates[i]), self.dropout_rate, self.attention_dropout_rate,
                    self.act, self.attention_impl, self.dtype, self.param_dtype,
                    self.dynamic_img_size, self.dynamic_resize_method,
                    name=f'block_{i}')(x, deterministic=deterministic)
    return x


class SwinTransformer(nn.Module):
  """Swin classifier; see the module docstring for the layout.

  Attributes:
    num_classes: logits per image; 0 or None builds no head (returns pooled features [B, C_last]).
    patch_size: p of the p x p patch partition.
    embed_dim: C of the first stage; stage s has C * 2^s channels.
    depths, num_heads: blocks and attention heads per stage (equal lengths = number of stages).
    window_size: M (int or (h, w)), clamped per stage to the token map as in timm.
    mlp_ratio: MLP hidden units / C.
    stochastic_depth: drop-path rate of the last block; it grows linearly from 0 over all blocks.
    dropout_rate: dropout after the attention projection and in the MLP (timm's proj_drop_rate).
    attention_dropout_rate: dropout on attention weights.
    act: 'gelu' (exact, timm) or 'gelu_tanh'.
    head_zeroinit: zero the head kernel (else truncated normal, std 0.02).
    attention_impl: 'auto' (default: cuDNN flash attention on NVIDIA GPUs where it applies, XLA's
      fused attention elsewhere), 'xla', 'cudnn', or None/'explicit' (plain softmax); see
      `attention.dot_product_attention`.
    dynamic_img_size: at an image size where a stage's window differs from the one its stored
      bias tables were built for (the map became smaller than window_size, or stopped being),
      resample the tables inside the call instead of refusing (see the module docstring).
    dynamic_resize_method: how: 'bicubic' (the family's checkpoint-transfer default), 'bilinear'
      or 'timm' (timm's `resize_rel_pos_bias_table`).
  """
  num_classes: Optional[int]
  patch_size: int = 4
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: Union[int, tuple[int, int]] = 7
  mlp_ratio: float = 4.0
  stochastic_depth: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  act: str = 'gelu'
  head_zeroinit: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = 'auto'
  dynamic_img_size: bool = False
  dynamic_resize_method: str = 'bicubic'

  def check(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Raises ValueError for fields or an image size that cannot work; returns the stage grids."""
    check_fields(self.embed_dim, self.depths, self.num_heads, self.window_size, self.act,
                 self.dynamic_resize_method)
    return stage_grids(image_hw, self.patch_size, len(self.depths))

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, features: bool = False,
               intermediates: Optional[backbone.Indices] = None, norm: bool = False,
               drop_prefix: bool = False):
    """Classifies images.

    Args:
      images: [B, H, W, C]; H and W multiples of patch_size.
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      features: return the stage outputs instead: a list of [B, h_s, w_s, embed_dim*2^s] per
        stage s (h_s = ceil(H/p/2^s)), each after its last block and before the final LayerNorm
        (timm's `forward_intermediates(norm=False)`, in NHWC).
      intermediates: stage indices (negative from the end; an int n: the last n): return the
        backbone dict of `vit_jax.models.backbone` instead, 'maps' [B, h_s, w_s, embed_dim*2^s]
        per index, 'prefix' [B, 0, embed_dim*2^s] each (Swin has no prefix tokens).
      norm: with `intermediates`, apply the final `norm` to the last stage's map (the others have
        other widths; timm's norm=True does the same).
      drop_prefix: with `intermediates`, leave 'prefix' out.

    Returns:
      logits [B, num_classes] (or pooled features [B, C_last] without a head), the feature list,
      or the backbone dict.
    """
    if features and intermediates is not None:
      raise ValueError('give either features=True or intermediates=..., not both')
    take = (None if intermediates is None
            else backbone.take_indices(intermediates, len(self.depths), 'stages'))
    self.check(images.shape[1:3])
    deterministic = not train
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='patch_embed')(images.astype(self.dtype))
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='patch_norm')(x)
    # Stochastic depth grows linearly over all blocks of all stages, from 0 at the first.
    rates = np.linspace(0.0, self.stochastic_depth, sum(self.depths))
    outs = []
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      first = sum(self.depths[:s])
      x = SwinStage(depth, heads, self.window_size, s > 0, tuple(rates[first:first + depth]),
                    self.mlp_ratio, self.dropout_rate, self.attention_dropout_rate, self.act,
                    self.attention_impl, self.dtype, self.param_dtype, self.dynamic_img_size,
                    self.dynamic_resize_method, name=f'stage_{s}')(x, deterministic=deterministic)
      outs.append(x)
    if features:
      return outs
    final_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                              name='norm')
    if take is not None:
      last = len(self.depths) - 1
      maps = [final_norm(outs[s]) if norm and s == last else outs[s] for s in take]
      return backbone.pack(maps, [backbone.no_prefix(m) for m in maps], drop_prefix)
    x = final_norm(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros if self.head_zeroinit else _dense_init,
                   name='head')(x)
    return x
