"""The layers of the EVA and BEiT families: rotary position embedding (EVA-02's 2-D RoPE), attention
with a fused q/k/v projection and biases on q and v only, SwiGLU / GELU MLPs with an optional
sub-norm, and the pre-norm block with optional LayerScale.

Parameter names inside a block (a file format; `vit_jax.families.eva_interop` maps them to timm's):
  norm1, norm2                         LayerNorm {scale, bias} [D]
  attn/qkv/kernel [D, 3, H, K]         no bias: timm's q/k/v Linear is bias-free ...
  attn/q_bias, attn/v_bias [H, K]      ... with learned q and v biases and a zero k bias
  attn/norm                            LayerNorm over H*K before the projection (EVA-02 B/L's
                                       `scale_attn_inner`), when `attn_norm`
  attn/relative_position_bias_table    [(2gh-1)(2gw-1)+3, H] (BEiT, `vit_jax.models.relpos`)
  attn/proj/{kernel [H, K, D], bias}
  mlp/fc1_g, mlp/fc1_x [D, M]          SwiGLU: silu(x W_g) * (x W_x); GELU MLP: mlp/fc1 [D, M]
  mlp/norm                             LayerNorm over M (EVA-02's `scale_mlp`), when `mlp_norm`
  mlp/fc2 [M, D]
  gamma_1, gamma_2 [D]                 LayerScale, when `layer_scale` is set
Keeping q/k/v on one [D, 3, H, K] kernel and the SwiGLU halves apart (timm packs them in one [2M, D]
Linear) leaves the heads and the hidden units on axes of their own, which tensor parallelism splits.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import relpos
from vit_jax.models import tokens as tokens_lib
from vit_jax.models.attention import dot_product_attention
from vit_jax.models.vit import LN_EPS, drop_path

Dtype = Any
MLPS = ('swiglu', 'gelu')
_INIT = nn.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02) for Linear weights


# ---------- rotary position embedding ----------

@functools.lru_cache(maxsize=64)
def rope_tables(grid: tuple[int, int], head_dim: int, ref_grid: Optional[tuple[int, int]] = None,
                temperature: float = 10_000.0) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos) [gh*gw, head_dim] float32 of EVA-02's 2-D RoPE (timm's `RotaryEmbeddingCat` with
  `in_pixels=False`), patches in row-major order.

  A quarter of the head's channels pairs rotate with the row coordinate, a quarter with the column,
  at frequencies 1 / temperature^(j / (head_dim/4)); each frequency covers two adjacent channels
  (the interleaved layout). With `ref_grid`, coordinates are rescaled so that this grid spans the
  reference grid the model was pre-trained at (EVA's scheme for other resolutions): row y sits at
  y / gh * ref_h.
  """
  if head_dim % 4:
    raise ValueError(f'rotary position embedding needs a head dim divisible by 4, got {head_dim}')
  bands = head_dim // 4
  freqs = (1.0 / (np.float32(temperature) ** (np.arange(bands, dtype=np.float32) / bands)))
  axes = []
  for size, ref in zip(grid, ref_grid or (None, None)):
    t = np.arange(size, dtype=np.float32)
    axes.append(t / np.float32(size) * np.float32(ref) if ref else t)
  coords = np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1)  # [gh, gw, 2]
  angles = (coords[..., None] * freqs.astype(np.float32)).reshape(-1, 2 * bands)
  expand = lambda a: np.repeat(a.astype(np.float32), 2, axis=-1)  # interleave: f0 f0 f1 f1 ...
  return expand(np.sin(angles)), expand(np.cos(angles))


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates channel pairs (2i, 2i+1) of x [B, T, H, K] by the angles of sin, cos ([T, K] or
  [B, T, K], float32); returns x's dtype."""
  sin = sin[None, :, None] if sin.ndim == 2 else sin[:, :, None]
  cos = cos[None, :, None] if cos.ndim == 2 else cos[:, :, None]
  rotated = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
  return (x * cos + rotated * sin).astype(x.dtype)


def get_or_create(module: nn.Module, name: str, init: Any, shape: Sequence[int], dtype: Dtype
                  ) -> tuple[jax.Array, bool]:
  """(a parameter, whether it was created now). An existing parameter is taken with the shape it
  has, which may be another grid's (`dynamic_img_size` resamples it), where `module.param` would
  insist on `shape`."""
  if module.has_variable('params', name):
    return module.get_variable('params', name), False
  return module.param(name, init, tuple(shape), dtype), True


# ---------- layers ----------

class Attention(nn.Module):
  """Self-attention with RoPE on the patch tokens and/or a BEiT relative position table.

  Call: x [B, T, D] (T = prefix + prompts + patches), rope (sin, cos) of the patches or None,
  keep [B, K] (the kept patches, for the table) or None. Returns ([B, T, D], weights or None).
  `grid` is the call's patch grid; `offset` the tokens before the patches (prefix + prompts).
  """
  num_heads: int
  grid: tuple[int, int]
  offset: int
  num_prompts: int = 0
  qkv_bias: bool = True
  inner_norm: bool = False
  rel_pos: bool = False
  posemb_grid: Optional[tuple[int, int]] = None
  dynamic_img_size: bool = False
  dropout_rate: float = 0.0
  implementation: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, rope: Optional[tuple[jax.Array, jax.Array]],
               keep: Optional[jax.Array], *, deterministic: bool = True,
               return_weights: bool = False):
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads {self.num_heads}')
    h, k = self.num_heads, d // self.num_heads
    qkv = nn.DenseGeneral((3, h, k), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=_INIT, name='qkv')(x)
    q, key, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + self.param('q_bias', zeros, (h, k), self.param_dtype).astype(q.dtype)
      v = v + self.param('v_bias', zeros, (h, k), self.param_dtype).astype(v.dtype)
    if rope is not None:
      o = self.offset
      q = jnp.concatenate([q[:, :o], apply_rope(q[:, o:], *rope)], axis=1)
      key = jnp.concatenate([key[:, :o], apply_rope(key[:, o:], *rope)], axis=1)
    bias = self._relative_bias(keep) if self.rel_pos else None
    rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      rng = self.make_rng('dropout')
    y, weights = dot_product_attention(
        q, key, v, implementation=self.implementation, dropout_rate=self.dropout_rate,
        dropout_rng=rng, deterministic=deterministic, return_weights=return_weights, bias=bias)
    if self.inner_norm:
      y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='norm')(y.reshape(b, t, d)).reshape(b, t, h, k)
    out = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=_INIT, name='proj')(y)
    return out, weights

  def _relative_bias(self, keep: Optional[jax.Array]) -> jax.Array:
    made = self.posemb_grid or self.grid
    table, created = get_or_create(self, 'relative_position_bias_table', nn.initializers.zeros,
                                   (relpos.table_rows(made), self.num_heads), self.param_dtype)
    if created or not self.dynamic_img_size or (
        self.posemb_grid is None and table.shape[0] == relpos.table_rows(self.grid)):
      own = made
      if table.shape[0] != relpos.table_rows(own):
        raise ValueError(
            f'the relative position tables hold {table.shape[0]} rows, not the '
            f'{relpos.table_rows(own)} of this {own[0]}x{own[1]} patch grid; set dynamic_img_size '
            'to resize them at call time, or build the model at the checkpoint\'s size')
    else:
      own = relpos.grid_of_table(table.shape[0], self.posemb_grid)
    table = relpos.resize_table(table, own, self.grid)
    return relpos.relative_bias(table, self.grid, keep=keep, num_prompts=self.num_prompts)


class Mlp(nn.Module):
  """fc1 -> GELU (exact) or SwiGLU -> dropout -> optional LayerNorm -> fc2 -> dropout."""
  hidden: int
  kind: str = 'swiglu'
  inner_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=_INIT, name=name)
    if self.kind == 'swiglu':
      y = nn.silu(dense(self.hidden, 'fc1_g')(x)) * dense(self.hidden, 'fc1_x')(x)
    elif self.kind == 'gelu':
      y = nn.gelu(dense(self.hidden, 'fc1')(x), approximate=False)
    else:
      raise ValueError(f'mlp {self.kind!r} is not one of {MLPS}')
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    if self.inner_norm:
      y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='norm')(y)
    y = dense(x.shape[-1], 'fc2')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Block(nn.Module):
  """x + g1 * Attn(LN(x)); x + g2 * MLP(LN(x)), with stochastic depth on both branches.

  Call (x, drop_rate, prompt, rope, keep) -> (x, attention weights or None); `prompt` [P, D] (deep
  prompt tuning) overwrites the P tokens after the prefix before the block runs.
  """
  num_heads: int
  mlp_dim: int
  grid: tuple[int, int]
  num_prefix: int
  num_prompts: int = 0
  mlp: str = 'swiglu'
  mlp_norm: bool = False
  attn_norm: bool = False
  qkv_bias: bool = True
  layer_scale: Optional[float] = None
  rel_pos: bool = False
  posemb_grid: Optional[tuple[int, int]] = None
  dynamic_img_size: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: bool = False
  deterministic: bool = True
  return_weights: bool = False
  attention_impl: Optional[str] = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array, prompt: Optional[jax.Array],
               rope: Optional[tuple[jax.Array, jax.Array]], keep: Optional[jax.Array]):
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    x = tokens_lib.set_prompts(x, prompt, self.num_prefix, inserted=True)
    y, weights = Attention(
        self.num_heads, self.grid, self.num_prefix + self.num_prompts, self.num_prompts,
        self.qkv_bias, self.attn_norm, self.rel_pos, self.posemb_grid, self.dynamic_img_size,
        self.attention_dropout_rate, self.attention_impl, self.dtype, self.param_dtype,
        name='attn')(norm('norm1')(x), rope, keep, deterministic=self.deterministic,
                     return_weights=self.return_weights)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + self._branch(y, 'gamma_1', drop_rate)
    y = Mlp(self.mlp_dim, self.mlp, self.mlp_norm, self.dropout_rate, self.dtype, self.param_dtype,
            name='mlp')(norm('norm2')(x), deterministic=self.deterministic)
    return x + self._branch(y, 'gamma_2', drop_rate), weights

  def _branch(self, y: jax.Array, gamma: str, drop_rate: jax.Array) -> jax.Array:
    if self.layer_scale is not None:
      g = self.param(gamma, nn.initializers.constant(self.layer_scale), (y.shape[-1],),
                     self.param_dtype)
      y = y * g.astype(y.dtype)
    if self.stochastic_depth and not self.deterministic:
      y = drop_path(y, drop_rate, self.make_rng('dropout'))
    return y
