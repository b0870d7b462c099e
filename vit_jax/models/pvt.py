"""Pyramid Vision Transformer v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision
Transformer", 2022), in Flax linen, numerically equal to timm's `pvt_v2_*` models.

Four stages; stage i works on a map of ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) tokens:

    x   = LN(Conv_{k,s}(x))                        (overlapping patch embedding: k7 s4, then k3 s2)
    x  += Attn(LN(x))                              (spatial-reduction attention, below)
    x  += fc2(act(DWConv3x3(fc1(LN(x)))))          (convolutional feed-forward)
    out = LN(x)                                    (per-stage norm; the stage's feature map)
    y   = head(mean_{h,w} out_4)

Spatial-reduction attention takes queries from every token but keys and values from a smaller map:
an sr x sr stride-sr convolution + LN (sr = 8, 4, 2, 1 over the stages; none for sr = 1), or in the
linear variant (`linear=True`, timm's `_li` models) a 7x7 adaptive average pool + 1x1 conv + LN +
act, which makes the cost linear in the number of tokens. The linear variant also puts a ReLU after
fc1.

Parameter paths mirror timm's module names ('/'-joined, `stages_{i}/blocks_{j}`); q is [D, H, K], kv
[D, 2, H, K] and proj [H, K, D] (heads explicit, so tensor parallelism can split them by head).
There are no position embeddings, so any image size whose stage maps are at least as large as the
reduction ratios runs without resampling anything: a call at another size equals building the model
there (timm's `pvt_v2` likewise takes any size), so the module needs no `dynamic_img_size` field.

Backbone API (`vit_jax.models.backbone`): `intermediates=(s, ...)` indexes the stages and returns
each stage's output [B, h_s, w_s, C_s] after the stage's own LayerNorm; `norm` changes nothing
(there is no final norm; timm's `forward_intermediates` ignores it too); no prefix tokens.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import backbone
from vit_jax.models.attention import dot_product_attention
from vit_jax.models.vit import ACTIVATIONS, drop_path, gelu

Dtype = Any

# timm's own LayerNorm (blocks, stage norms) uses 1e-6; torch.nn.LayerNorm (patch embeddings and the
# reduction norm inside attention) keeps PyTorch's 1e-5.
LN_EPS = 1e-6
TORCH_LN_EPS = 1e-5
ACTS = ACTIVATIONS
POOL_SIZE = 7  # the linear variant's adaptive pool output, 7x7 keys and values at every size


def activation(name: str):
  """'gelu' (exact erf, as PyTorch) or 'gelu_tanh' (tanh approximation), checked now."""
  if name not in ACTIVATIONS:
    raise ValueError(f'act {name!r} is not one of {ACTIVATIONS}')
  return lambda x: gelu(x, name)


def stage_sizes(h: int, w: int, num_stages: int = 4) -> list[tuple[int, int]]:
  """Token-map size (h_i, w_i) of each stage: ceil(h / 2^(i+2)), as the padded convs give."""
  return [(-(-h // 2 ** (i + 2)), -(-w // 2 ** (i + 2))) for i in range(num_stages)]


def min_image_size(sr_ratios: Sequence[int], linear: bool) -> int:
  """Smallest height/width for which every stage map is at least its reduction ratio."""
  if linear:
    return 1
  return max(2 ** (i + 2) * (sr - 1) + 1 for i, sr in enumerate(sr_ratios))


def check_image_size(h: int, w: int, sr_ratios: Sequence[int], linear: bool) -> None:
  """Raises a ValueError when a stage map of an h x w image is smaller than its reduction ratio."""
  if h < 1 or w < 1:
    raise ValueError(f'image size {h}x{w} is empty')
  if linear:
    return
  for i, ((sh, sw), sr) in enumerate(zip(stage_sizes(h, w, len(sr_ratios)), sr_ratios)):
    if sh < sr or sw < sr:
      raise ValueError(
          f'image size {h}x{w} gives a {sh}x{sw} token map in stage {i}, smaller than its '
          f'spatial-reduction ratio {sr}; use images of at least '
          f'{min_image_size(sr_ratios, linear)} px per side (multiples of 32 give maps of '
          'exactly H/4 ... H/32)')


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging matrix of PyTorch's adaptive average pooling along one axis.

  Bin i covers [floor(i * size / out), ceil((i + 1) * size / out)); bins overlap when size is not a
  multiple of out, and repeat inputs when size < out.
  """
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _dense_init():
  return nn.initializers.truncated_normal(stddev=0.02)


def _conv_init(kernel: Sequence[int], features: int, groups: int = 1):
  """He-normal over fan-out (timm's conv init): std sqrt(2 / (kh * kw * features / groups))."""
  return nn.initializers.normal(stddev=math.sqrt(2.0 / (math.prod(kernel) * features // groups)))


class OverlapPatchEmbed(nn.Module):
  """Conv (kernel k, stride s, padding k // 2) + LayerNorm.

  [B, H, W, C] -> [B, ceil(H/s), ceil(W/s), D].
  """
  features: int
  kernel: int
  stride: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, p = self.kernel, self.kernel // 2
    x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride), padding=((p, p), (p, p)),
                dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_conv_init((k, k), self.features), name='proj')(x)
    return nn.LayerNorm(epsilon=TORCH_LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='norm')(x)


class SpatialReductionAttention(nn.Module):
  """Queries from all tokens, keys/values from a reduced map. x: [B, h, w, D] -> [B, h, w, D]."""
  num_heads: int
  sr_ratio: int
  linear: bool = False
  act: str = 'gelu'
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    b, h, w, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads {self.num_heads}')
    heads, head_dim = self.num_heads, d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda features, name: nn.DenseGeneral(features, kernel_init=_dense_init(), name=name,
                                                   **kw)
    q = dense((heads, head_dim), 'q')(x.reshape(b, h * w, d))

    y = x
    if self.linear:
      # Adaptive pooling as two small matmuls with PyTorch's (possibly overlapping) bins.
      ph = jnp.asarray(adaptive_pool_matrix(h, POOL_SIZE), y.dtype)
      pw = jnp.asarray(adaptive_pool_matrix(w, POOL_SIZE), y.dtype)
      y = jnp.einsum('ih,jw,bhwc->bijc', ph, pw, y)
      y = nn.Conv(d, (1, 1), kernel_init=_conv_init((1, 1), d), name='sr', **kw)(y)
    elif self.sr_ratio > 1:
      s = self.sr_ratio
      y = nn.Conv(d, (s, s), strides=(s, s), padding='VALID', kernel_init=_conv_init((s, s), d),
                  name='sr', **kw)(y)
    if self.linear or self.sr_ratio > 1:
      y = nn.LayerNorm(epsilon=TORCH_LN_EPS, name='norm', **kw)(y)
    if self.linear:
      y = activation(self.act)(y)
    kv = dense((2, heads, head_dim), 'kv')(y.reshape(b, -1, d))

    rng = None
    if self.attention_dropout_rate > 0.0 and not deterministic:
      rng = self.make_rng('dropout')
    out, _ = dot_product_attention(
        q, kv[:, :, 0], kv[:, :, 1], implementation=self.attention_impl,
        dropout_rate=self.attention_dropout_rate, dropout_rng=rng, deterministic=deterministic)
    out = nn.DenseGeneral(d, axis=(-2, -1), kernel_init=_dense_init(), name='proj', **kw)(out)
    out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
    return out.reshape(b, h, w, d)


class ConvMlp(nn.Module):
  """fc1 -> (ReLU if linear) -> depth-wise 3x3 conv -> act -> dropout -> fc2 -> dropout.

  [B, h, w, D] -> [B, h, w, D].
  """
  hidden: int
  linear: bool = False
  act: str = 'gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=_dense_init(), name='fc1', **kw)(x)
    if self.linear:
      x = nn.relu(x)
    x = nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=self.hidden,
                kernel_init=_conv_init((3, 3), self.hidden, self.hidden), name='dwconv', **kw)(x)
    x = activation(self.act)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(d, kernel_init=_dense_init(), name='fc2', **kw)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """x += DropPath(Attn(LN(x))); x += DropPath(ConvMlp(LN(x))), on [B, h, w, D]."""
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  linear: bool = False
  act: str = 'gelu'
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, name=name, **kw)
    use_drop_path = self.drop_path_rate > 0.0 and not deterministic

    y = SpatialReductionAttention(
        self.num_heads, self.sr_ratio, self.linear, self.act, self.dropout_rate,
        self.attention_dropout_rate, self.attention_impl, name='attn', **kw)(
            norm('norm1')(x), deterministic=deterministic)
    if use_drop_path:
      y = drop_path(y, self.drop_path_rate, self.make_rng('dropout'))
    x = x + y
    y = ConvMlp(int(x.shape[-1] * self.mlp_ratio), self.linear, self.act, self.dropout_rate,
                name='mlp', **kw)(norm('norm2')(x), deterministic=deterministic)
    if use_drop_path:
      y = drop_path(y, self.drop_path_rate, self.make_rng('dropout'))
    return x + y


class Stage(nn.Module):
  """(Downsampling patch embedding,) `depth` blocks and a LayerNorm.

  [B, h, w, C] -> [B, h', w', D] (h' = ceil(h / 2) when downsampling).
  """
  features: int
  depth: int
  downsample: bool
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  linear: bool = False
  act: str = 'gelu'
  drop_path_rates: Sequence[float] = ()
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = OverlapPatchEmbed(self.features, 3, 2, name='downsample', **kw)(x)
    for j in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.sr_ratio, self.linear, self.act,
                self.drop_path_rates[j], self.dropout_rate, self.attention_dropout_rate,
                self.attention_impl, name=f'blocks_{j}', **kw)(x, deterministic=deterministic)
    return nn.LayerNorm(epsilon=LN_EPS, name='norm', **kw)(x)


class PyramidVisionTransformerV2(nn.Module):
  """PVT v2 classifier; see the module docstring for the structure and the parameter layout.

  Attributes:
    num_classes: logits per image; 0 or None builds no head (returns the pooled [B, C_4] features).
    embed_dims, num_heads, mlp_ratios, depths, sr_ratios: per stage (4 entries each).
    linear: the linear-complexity variant (7x7 pooled keys/values, ReLU in the MLP).
    stochastic_depth: final drop-path rate, 0 at the first block rising linearly over all blocks.
    dropout_rate: after the attention proj, inside the MLP and before the head;
      attention_dropout_rate: on the attention weights (both train=True only).
    act: 'gelu' (exact, timm) or 'gelu_tanh', for every GELU of the model.
    head_zeroinit: zero the head kernel (fine-tuning), else truncated normal(0.02) as timm.
    attention_impl: 'auto' (default: cuDNN flash attention on NVIDIA GPUs where it applies, XLA's
      fused attention elsewhere), 'xla', 'cudnn', or None/'explicit' (plain softmax); see
      `attention.dot_product_attention`.
  """
  num_classes: Optional[int]
  embed_dims: Sequence[int] = (64, 128, 320, 512)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  depths: Sequence[int] = (3, 4, 6, 3)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  linear: bool = False
  stochastic_depth: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  act: str = 'gelu'
  head_zeroinit: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = 'auto'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, features: bool = False,
               intermediates: Optional[backbone.Indices] = None, norm: bool = False,
               drop_prefix: bool = False):
    """Classifies images.

    Args:
      images: [B, H, W, C] float, any C; H and W large enough for the reduction ratios
        (29 px with the default (8, 4, 2, 1)); need not be multiples of 32.
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      features: return the four stage outputs [B, ceil(H/4), ceil(W/4), C_1] ...
        [B, ceil(H/32), ceil(W/32), C_4] (after each stage's LayerNorm) instead of logits.
      intermediates: stage indices (negative from the end; an int n: the last n): return the
        backbone dict of `vit_jax.models.backbone` instead, 'maps' (the stage outputs above) per
        index and 'prefix' [B, 0, C_s] each (PVT has no prefix tokens).
      norm: accepted for the common API; every stage output is already normed (timm ignores it too).
      drop_prefix: with `intermediates`, leave 'prefix' out.

    Returns:
      logits [B, num_classes] in `dtype` (pooled [B, C_4] features without a head), the list of
      stage maps, or the backbone dict.
    """
    del norm  # each stage ends in its own LayerNorm; there is no final one to apply
    if features and intermediates is not None:
      raise ValueError('give either features=True or intermediates=..., not both')
    n = len(self.depths)
    for field in ('embed_dims', 'num_heads', 'mlp_ratios', 'sr_ratios'):
      if len(getattr(self, field)) != n:
        raise ValueError(f'{field} has {len(getattr(self, field))} entries but depths has {n}; '
                         'give one per stage')
    take = (None if intermediates is None
            else backbone.take_indices(intermediates, n, 'stages'))
    activation(self.act)  # validates the name before building anything
    _, h, w, _ = images.shape
    check_image_size(h, w, self.sr_ratios, self.linear)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Drop-path rates rise linearly from 0 over all blocks of all stages (timm's schedule).
    rates = np.linspace(0.0, self.stochastic_depth, sum(self.depths)).tolist()

    x = OverlapPatchEmbed(self.embed_dims[0], 7, 4, name='patch_embed', **kw)(
        images.astype(self.dtype))
    maps = []
    for i in range(n):
      first = sum(self.depths[:i])
      stage_rates = tuple(rates[first:first + self.depths[i]])
      x = Stage(self.embed_dims[i], self.depths[i], i > 0, self.num_heads[i], self.mlp_ratios[i],
                self.sr_ratios[i], self.linear, self.act, stage_rates,
                self.dropout_rate, self.attention_dropout_rate, self.attention_impl,
                name=f'stages_{i}', **kw)(x, deterministic=not train)
      maps.append(x)
    if features:
      return maps
    if take is not None:
      chosen = [maps[s] for s in take]
      return backbone.pack(chosen, [backbone.no_prefix(m) for m in chosen], drop_prefix)

    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
      x = nn.Dense(self.num_classes, kernel_init=(nn.initializers.zeros if self.head_zeroinit
                                                  else _dense_init()), name='head', **kw)(x)
    return x
