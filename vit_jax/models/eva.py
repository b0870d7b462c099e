"""EVA-02 (Fang et al., 2023) and the RoPE ViTs timm builds with its `Eva` class, in Flax linen.

    z_0  = [cls; reg_1..R; x_p^1 E; ...; x_p^N E] (+ E_pos)   learned table optional, RoPE optional
    z'_l = z_{l-1} + g1 * Attn(LN(z_{l-1}))                    RoPE rotates the patches' q and k
    z_l  = z'_l + g2 * MLP(LN(z'_l))                           SwiGLU (EVA-02) or GELU
    y    = LN(mean of the patch tokens) (`gap`), or LN(z_L)[cls] (`token`)

`Backbone` is the forward pass this family shares with BEiT (`vit_jax.models.beit`): patch
embedding, prefix tokens, the learned position table, the token-level inputs of training objectives
(`vit_jax.models.tokens`), the blocks of `eva_layers`, intermediate layers, pooling and the head.
Top-level parameters: patch_embed {kernel [p, p, C, D], bias}, cls [1, 1, D], reg [1, R, D],
pos_embed [1, (prefix +) gh*gw, D], block_{i}/... (see `eva_layers`), norm (class-token models),
fc_norm (pooled models), head.

Any image size at call time (`dynamic_img_size=True`): the learned table is resampled inside the
jitted function to the input's grid by antialiased bicubic interpolation (as timm, and as
`vit_jax.families.resample` moves a checkpoint), the RoPE angles are computed for that grid, and
BEiT's relative tables are resized (`vit_jax.models.relpos`). A table's own grid: `posemb_grid` if
set, else the call's grid if the row count fits it, else the square its rows make.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import backbone
from vit_jax.models import resize
from vit_jax.models import tokens as tokens_lib
from vit_jax.models.eva_layers import MLPS, Block, get_or_create, rope_tables
from vit_jax.models.tokens import TokenInputs
from vit_jax.models.vit import LN_EPS, pair, remat_block

Dtype = Any
CLASSIFIERS = ('token', 'gap')
POSEMBS = ('learned', 'none')


def resample_table(grid_rows: jax.Array, old: Sequence[int], new: Sequence[int],
                   method: str = 'bicubic') -> jax.Array:
  """[gh*gw, D] rows of a position table -> [nh*nw, D] inside a jitted call: the operator of
  `vit_jax.models.resize.resample_grid(method)` (timm's antialiased bicubic by default), the
  method a checkpoint transfer applies in numpy."""
  old, new = tuple(int(v) for v in old), tuple(int(v) for v in new)
  if old == new:
    return grid_rows
  op = jnp.asarray(resize.grid_operator(old, new, method))
  out = jnp.matmul(op, grid_rows.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid_rows.dtype)


def _square(rows: int, what: str) -> tuple[int, int]:
  side = math.isqrt(rows)
  if side * side != rows:
    raise ValueError(f'{what} holds {rows} patch rows, not a square grid; set the posemb_grid '
                     'field to the grid it was made for')
  return side, side


class Backbone(nn.Module):
  """What EVA and BEiT share; a family's module subclasses it (see the module docstring).

  Attributes:
    num_classes: head width; 0 or None builds no head.
    patch_size, hidden_size, num_layers, num_heads, mlp_dim: p, D, L, heads, M.
    classifier: 'gap' (mean of the patch tokens, then `fc_norm`) or 'token' (the class token after
      the final `norm`). fc_norm: None follows the classifier (timm's `use_fc_norm`); a model with
      fc_norm has no final norm.
    posemb: 'learned' (`pos_embed`) or 'none'.
    qkv_bias: learned q and v biases. layer_scale: LayerScale's initial value (None: none).
    posemb_grid: the grid the position / relative tables were made for, when not square.
    dynamic_img_size: inputs of any grid run with their tables resampled inside the jitted function.
    head_zeroinit, dropout_rate, attention_dropout_rate, stochastic_depth, dtype, param_dtype,
      remat, attention_impl: as `vit_jax.models.vit.VisionTransformer`.
  """
  num_classes: Optional[int]
  patch_size: Union[int, Sequence[int]]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'gap'
  fc_norm: Optional[bool] = None
  posemb: str = 'learned'
  qkv_bias: bool = True
  layer_scale: Optional[float] = None
  posemb_grid: Optional[tuple[int, int]] = None
  dynamic_img_size: bool = False
  head_zeroinit: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: Union[bool, str] = False
  attention_impl: Optional[str] = 'auto'

  # ---- what a family's module defines ----
  def prefix_tokens(self, d: int) -> list[jax.Array]:
    """The [1, n, D] prefix parameters in sequence order (class token, registers)."""
    raise NotImplementedError

  def posemb_covers_prefix(self) -> bool:
    """Whether the learned table has rows for the prefix tokens (timm's `not no_embed_class`)."""
    return True

  def rope_embedding(self, grid: tuple[int, int], keep: Optional[jax.Array]):
    """(sin, cos) of the patches ([N, K], or [B, K', K] for kept patches), or None."""
    del grid, keep
    return None

  def block_options(self) -> dict[str, Any]:
    """Block fields besides the shared ones (mlp kind, sub-norms, relative tables)."""
    return {}

  @property
  def uses_fc_norm(self) -> bool:
    return self.classifier == 'gap' if self.fc_norm is None else bool(self.fc_norm)

  def check(self) -> None:
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier {self.classifier!r} is not one of {CLASSIFIERS}')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb {self.posemb!r} is not one of {POSEMBS}')

  # ---- the forward pass ----
  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_aux: bool = False,
               features: bool = False, tokens: Optional[TokenInputs] = None,
               return_weights: Optional[bool] = None,
               intermediates: Optional[Union[int, Sequence[int]]] = None, norm: bool = False,
               drop_prefix: bool = False):
    """Classifies images [B, H, W, C] (H, W multiples of the patch size).

    Returns logits [B, classes] (pre-logits without a head); with return_aux (logits, aux) where
    aux has 'pre_logits', 'prefix_tokens' [B, P, D], 'patch_tokens' [B, N, D] (after the final
    norm, if the model has one) and 'attention_weights' [L, B, H, T, T] or None. features=True:
    [the patch tokens as a [B, gh, gw, D] map]. intermediates=(i, ...): {'maps': [B, gh, gw, D]
    after block i, 'prefix': [B, P, D]} (no 'prefix' with drop_prefix; norm=True applies the final
    norm, which gap models do not have, as timm's `forward_intermediates`), in the order given; an
    int n: the last n blocks.
    """
    self.check()
    return_weights = return_aux if return_weights is None else return_weights
    ph, pw = pair(self.patch_size)
    _, h, w, _ = images.shape
    if h % ph or w % pw:
      raise ValueError(f'image size {h}x{w} is not divisible by the patch size {ph}x{pw}')
    x = nn.Conv(self.hidden_size, (ph, pw), strides=(ph, pw), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='patch_embed')(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    grid = (gh, gw)
    x = tokens_lib.edit_patches(x.reshape(b, gh * gw, d), tokens)
    prefix_params = self.prefix_tokens(d)
    prefix = sum(p.shape[1] for p in prefix_params)
    prefix_x = [jnp.broadcast_to(p.astype(x.dtype), (b, *p.shape[1:])) for p in prefix_params]
    covers = self.posemb_covers_prefix()
    if covers:
      x = jnp.concatenate(prefix_x + [x], axis=1)
    if self.posemb == 'learned':
      x = x + self._position_table(grid, prefix if covers else 0, d).astype(x.dtype)
    if not covers:
      x = jnp.concatenate(prefix_x + [x], axis=1)
    x = tokens_lib.keep_patches(x, prefix, tokens)
    keep = None if tokens is None else tokens.keep
    num_prompts = 0 if tokens is None else tokens.num_prompts()
    x = tokens_lib.set_prompts(x, tokens_lib.prompt_at(tokens, 0), prefix, inserted=False)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    rope = self.rope_embedding(grid, keep)

    wanted = (None if intermediates is None
              else backbone.take_indices(intermediates, self.num_layers))
    last = self.num_layers - 1 if wanted is None else max(wanted)
    rates = jnp.linspace(0.0, self.stochastic_depth, self.num_layers, dtype=jnp.float32)
    block = remat_block(Block, self.remat, prevent_cse=True)
    deep = tokens is not None and tokens.deep()
    post_norm = None if self.uses_fc_norm else nn.LayerNorm(
        epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name='norm')
    taken, weights = {}, []
    for i in range(last + 1):
      x, wi = block(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, grid=grid, num_prefix=prefix,
          num_prompts=num_prompts, qkv_bias=self.qkv_bias, layer_scale=self.layer_scale,
          posemb_grid=self.posemb_grid, dynamic_img_size=self.dynamic_img_size,
          dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
          stochastic_depth=self.stochastic_depth > 0, deterministic=not train,
          return_weights=return_weights, attention_impl=self.attention_impl, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f'block_{i}', **self.block_options())(
              x, rates[i], tokens.prompts[i] if deep and i else None, rope, keep)
      weights.append(wi)
      if wanted is not None and i in wanted:
        taken[i] = tokens_lib.drop_prompts(x, prefix, tokens)
    if wanted is not None:
      if keep is not None:
        raise ValueError('intermediates return full patch grids; they cannot be used with '
                         'tokens.keep')
      outs = [post_norm(taken[i]) if norm and post_norm is not None else taken[i] for i in wanted]
      return backbone.pack([y[:, prefix:].reshape(b, gh, gw, d) for y in outs],
                           [y[:, :prefix] for y in outs], drop_prefix)

    x = tokens_lib.drop_prompts(x, prefix, tokens)
    if post_norm is not None:
      x = post_norm(x)
    if features:
      if keep is not None:
        raise ValueError('features=True returns the full patch grid; it cannot be used with '
                         'tokens.keep')
      return [x[:, prefix:].reshape(b, gh, gw, d)]
    token_map = {'prefix_tokens': x[:, :prefix], 'patch_tokens': x[:, prefix:]}
    pooled = x[:, 0] if self.classifier == 'token' else jnp.mean(x[:, prefix:], axis=1)
    if self.uses_fc_norm:
      pooled = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                            name='fc_norm')(pooled)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    out = pooled
    if self.num_classes:
      out = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=(nn.initializers.zeros if self.head_zeroinit
                                  else nn.initializers.truncated_normal(0.02)),
                     name='head')(pooled)
    if return_aux:
      stacked = jnp.stack(weights) if return_weights else None
      return out, {'pre_logits': pooled, 'attention_weights': stacked, **token_map}
    return out

  def _position_table(self, grid: tuple[int, int], rows_prefix: int, d: int) -> jax.Array:
    """The learned table [1, rows_prefix + gh*gw, D] at the call's grid (resampled if dynamic)."""
    made = self.posemb_grid or grid
    table, created = get_or_create(self, 'pos_embed', nn.initializers.normal(0.02),
                                   (1, rows_prefix + made[0] * made[1], d), self.param_dtype)
    patch_rows = table.shape[1] - rows_prefix
    if created or self.posemb_grid is not None:
      own = made
    elif self.dynamic_img_size and patch_rows != grid[0] * grid[1]:
      own = _square(patch_rows, 'the position table')
    else:  # a table with the call grid's row count is taken as that grid's
      own = grid
    if own[0] * own[1] != patch_rows:
      raise ValueError(
          f'the position table holds {patch_rows} patch rows, not the {own[0] * own[1]} of a '
          f'{own[0]}x{own[1]} patch grid; set dynamic_img_size to resample it at call time, or '
          'build the model at the checkpoint\'s size')
    grid_rows = resample_table(table[0, rows_prefix:], own, grid)
    return jnp.concatenate([table[0, :rows_prefix], grid_rows], axis=0)[None]


class Eva(Backbone):
  """EVA-02 / RoPE ViT (timm's `Eva`). Fields beyond `Backbone`'s:

    class_token: a class token `cls`; num_registers: register tokens `reg` after it (prefix tokens,
      returned apart, excluded from the mean); no_embed_class: the learned table has no rows for them
      (timm's name).
    rope: 2-D rotary position embedding of the patches (`eva_layers.rope_tables`); rope_ref_grid:
      the pre-training grid its coordinates are scaled to (EVA-02: 16x16); rope_temperature.
    mlp: 'swiglu' or 'gelu'; mlp_norm: a LayerNorm inside the MLP (EVA-02's `scale_mlp`);
      attn_norm: one inside attention before the projection (`scale_attn_inner`).
  """
  class_token: bool = True
  num_registers: int = 0
  no_embed_class: bool = False
  rope: bool = True
  rope_ref_grid: Optional[tuple[int, int]] = None
  rope_temperature: float = 10_000.0
  mlp: str = 'swiglu'
  mlp_norm: bool = False
  attn_norm: bool = False

  def check(self) -> None:
    super().check()
    if self.classifier == 'token' and not self.class_token:
      raise ValueError("classifier='token' needs class_token=True")
    if self.mlp not in MLPS:
      raise ValueError(f'mlp {self.mlp!r} is not one of {MLPS}')

  def prefix_tokens(self, d: int) -> list[jax.Array]:
    out = []
    if self.class_token:
      out.append(self.param('cls', nn.initializers.normal(0.02), (1, 1, d), self.param_dtype))
    if self.num_registers:
      out.append(self.param('reg', nn.initializers.normal(0.02), (1, self.num_registers, d),
                            self.param_dtype))
    return out

  def posemb_covers_prefix(self) -> bool:
    return not self.no_embed_class

  def rope_embedding(self, grid, keep):
    if not self.rope:
      return None
    ref = tuple(pair(self.rope_ref_grid)) if self.rope_ref_grid is not None else None
    sin, cos = rope_tables(grid, self.hidden_size // self.num_heads, ref,
                           float(self.rope_temperature))
    sin, cos = jnp.asarray(sin), jnp.asarray(cos)
    if keep is not None:
      sin, cos = sin[keep.astype(jnp.int32)], cos[keep.astype(jnp.int32)]
    return sin, cos

  def block_options(self) -> dict[str, Any]:
    return dict(mlp=self.mlp, mlp_norm=self.mlp_norm, attn_norm=self.attn_norm)
