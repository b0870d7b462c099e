"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), in Flax linen.

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (patch embedding, position embedding)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                         (pre-LayerNorm attention)
    z_l  = MLP(LN(z'_l)) + z'_l                               (pre-LayerNorm MLP with GELU)
    y    = LN(z_L^0)                                          (class token; or pooled, see `classifier`)

Parameter paths are a file format: without `scan` the tree matches Google's released ViT checkpoints
(and what timm's `.npz` loader reads): `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
`Transformer/encoder_norm`, `pre_logits`, `head`. With `scan=True` the blocks are one module
`Transformer/encoderblock` whose parameters have a leading [num_layers] axis (big_vision's layout);
`vit_jax.models.params` converts between the two.

Later ViTs are fields of the same model, each off by default (Google's checkpoints load unchanged):
  layer_scale     LayerScale after attention and MLP (CaiT, DeiT III, DINOv2): per block
                  `LayerScale_1/scale` and `LayerScale_3/scale` [D], starting at this value;
  num_registers   register tokens (Darcet et al., 2024) `registers` [1, R, D] after the class token:
                  prefix tokens that no pooling reads;
  no_embed_class  the position table has rows for the patches only (timm's name; DeiT III, DINOv2
                  with registers): prefix tokens get no position embedding;
  fc_norm         the final LayerNorm after pooling (`fc_norm`) instead of on every token
                  (`Transformer/encoder_norm`), as timm's default for average pooling;
  classifier      'token', 'gap' (mean of the patch tokens) or 'map' (attention pooling, SigLIP).
And a backbone API: `dynamic_img_size` (any grid at call time, the learned table resampled inside
the call), `intermediates=(i, ...)` (the chosen blocks' token maps, prefix tokens apart), and
FlexiViT's `patch_size=` at call time (the kernel PI-resized inside the call).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import backbone
from vit_jax.models import resize
from vit_jax.models import tokens as tokens_lib
from vit_jax.models.attention import MultiHeadDotProductAttention, rows
from vit_jax.models.layers import (ACTIVATIONS, LN_EPS, POSEMBS, REMAT_POLICIES,  # noqa: F401
                                   RESIZE_METHODS, AddPositionEmbs, LayerScale, MAPHead, MlpBlock,
                                   ResizedPatchEmbedding, drop_path, gelu, pair, remat_block,
                                   sincos_2d)
from vit_jax.models.tokens import TokenInputs

Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map')


def num_prefix_tokens(classifier: str, num_registers: int = 0) -> int:
  """Tokens before the patch tokens in the sequence: the class token ('token' classifier), then the
  registers."""
  return (1 if classifier == 'token' else 0) + int(num_registers)


class Encoder1DBlock(nn.Module):
  """One pre-LN transformer block; call(x, drop_rate, prompt) -> (x, out): out is the attention
  weights (or None), or with `emit_hidden` the pair (weights, x), so that a scanned stack also
  returns every block's output (intermediate layers).

  The (carry, per-layer inputs) -> (carry, per-layer output) signature lets `nn.scan` stack the
  blocks. `prompt` [P, D] (deep visual prompt tuning, `vit_jax.models.tokens`) replaces the P tokens
  after the first `prompt_offset` before the block runs; None leaves the sequence as it is.
  `layer_scale`: each residual branch is multiplied by a learned per-channel scale
  (`LayerScale_1` after attention, `LayerScale_3` after the MLP) that starts at this value.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: bool = False
  deterministic: bool = True
  return_weights: bool = False
  attention_impl: Optional[str] = 'auto'
  act: str = 'gelu_tanh'
  prompt_offset: int = 0
  layer_scale: Optional[float] = None
  emit_hidden: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array, prompt: Optional[jax.Array] = None):
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    scale = lambda y, name: (y if self.layer_scale is None
                             else LayerScale(self.layer_scale, self.param_dtype, name=name)(y))
    use_drop_path = self.stochastic_depth and not self.deterministic
    x = tokens_lib.set_prompts(x, prompt, self.prompt_offset, inserted=True)

    y = norm('LayerNorm_0')(rows(x, self.dtype)).reshape(x.shape)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        dropout_rate=self.attention_dropout_rate, implementation=self.attention_impl,
        name='MultiHeadDotProductAttention_1')(
            y, deterministic=self.deterministic, return_weights=self.return_weights)
    y = scale(nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic), 'LayerScale_1')
    if use_drop_path:
      y = drop_path(y, drop_rate, self.make_rng('dropout'))
    x = x + y

    y = norm('LayerNorm_2')(rows(x, self.dtype)).reshape(x.shape)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.act, self.dtype, self.param_dtype,
                 name='MlpBlock_3')(
        y, deterministic=self.deterministic)
    y = scale(y, 'LayerScale_3')
    if use_drop_path:
      y = drop_path(y, drop_rate, self.make_rng('dropout'))
    x = x + y
    return x, ((weights, x) if self.emit_hidden else weights)


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and the final LayerNorm (`encoder_norm`,
  absent when `final_norm` is False: the model normalises after pooling instead).

  The position table (`AddPositionEmbs`): `table_prefix` rows for the prefix tokens (None: all),
  `posemb_grid` its grid when it is not the input's, `dynamic_img_size` resamples it to the input's
  grid inside the call (`dynamic_resize`: 'bilinear' or 'bicubic', the checkpoint transfer's
  methods)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = 'learned'
  grid: tuple[int, int] = (1, 1)
  num_prefix: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: Optional[str] = 'auto'
  remat: Union[bool, str] = False
  scan: bool = False
  act: str = 'gelu_tanh'
  table_prefix: Optional[int] = None
  posemb_grid: Optional[tuple[int, int]] = None
  dynamic_img_size: bool = False
  dynamic_resize: str = 'bilinear'
  layer_scale: Optional[float] = None
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_weights: bool = False,
               tokens: Optional[TokenInputs] = None, take: Optional[Sequence[int]] = None,
               take_norm: bool = False):
    """x: [B, N, D] tokens (prefix first). Returns ([B, N', D], weights [L, B, H, T, T] float32 or
    None): with `tokens.keep` N' = prefix + K, else N; prompts are dropped from the output (T counts
    them).

    With `take` (block indices in [0, L)): returns instead the list of those blocks' outputs
    [B, N', D], in the order given, each through `encoder_norm` when `take_norm` (and the encoder
    has one). Without a scan, the blocks after the last one taken are not run."""
    grid = None if self.posemb_grid is None else tuple(self.posemb_grid)
    x = AddPositionEmbs(self.posemb, self.grid, self.num_prefix, self.param_dtype,
                        table_prefix=self.table_prefix, table_grid=grid,
                        dynamic=self.dynamic_img_size, resize=self.dynamic_resize,
                        name='posembed_input')(x)
    x = tokens_lib.keep_patches(x, self.num_prefix, tokens)
    x = tokens_lib.set_prompts(x, tokens_lib.prompt_at(tokens, 0), self.num_prefix, inserted=False)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Stochastic depth grows linearly with depth (DeiT): 0 at the first block.
    rates = jnp.linspace(0.0, self.stochastic_depth, self.num_layers, dtype=jnp.float32)
    kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  stochastic_depth=self.stochastic_depth > 0, deterministic=not train,
                  return_weights=return_weights, attention_impl=self.attention_impl,
                  act=self.act, prompt_offset=self.num_prefix, layer_scale=self.layer_scale,
                  emit_hidden=take is not None, dtype=self.dtype, param_dtype=self.param_dtype)
    block = remat_block(Encoder1DBlock, self.remat, prevent_cse=not self.scan)
    # Deep prompts: block i's prompt slots are overwritten by prompts[i] (i = 0 is the insertion).
    deep = tokens is not None and tokens.deep()
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=0, length=self.num_layers)
      x, out = stack(name='encoderblock', **kwargs)(x, rates, tokens.prompts if deep else None)
      weights, hidden = out if take is not None else (out, None)
    else:
      all_weights, hidden = [], []
      for i in range(self.num_layers if take is None else max(take, default=-1) + 1):
        prompt = tokens.prompts[i] if deep and i else None
        x, out = block(name=f'encoderblock_{i}', **kwargs)(x, rates[i], prompt)
        w, h = out if take is not None else (out, None)
        all_weights.append(w)
        hidden.append(h)
      weights = jnp.stack(all_weights) if return_weights else None
    norm = (nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                         name='encoder_norm') if self.final_norm else None)
    if take is not None:
      taken = [tokens_lib.drop_prompts(hidden[i], self.num_prefix, tokens) for i in take]
      return [norm(h) if take_norm and norm is not None else h for h in taken]
    x = tokens_lib.drop_prompts(x, self.num_prefix, tokens)
    return (x if norm is None else norm(x)), weights


def embed_patches(module: nn.Module, images: jax.Array, patch_hw: tuple[int, int],
                  stored_hw: Optional[tuple[int, int]] = None, method: str = 'linear'
                  ) -> tuple[jax.Array, tuple[int, int]]:
  """The patch embedding `embedding` (a conv of stride = patch) as tokens: ([B, gh*gw, D], (gh, gw)).

  Call from a compact method of a module with ViT fields (hidden_size, dtype, param_dtype): the conv
  is created in that module's scope, where Google's checkpoints keep it. With `stored_hw` (the
  kernel's own patch) other than `patch_hw`, the kernel is PI-resized to `patch_hw` in the call
  (FlexiViT; `method` as `resize.pi_resize_kernel_jax`).
  """
  ph, pw = patch_hw
  _, h, w, _ = images.shape
  if h % ph or w % pw:
    raise ValueError(f'image size {h}x{w} is not divisible by the patch size {ph}x{pw}')
  if stored_hw is not None and tuple(stored_hw) != (ph, pw):
    x = ResizedPatchEmbedding(module.hidden_size, tuple(stored_hw), method, module.dtype,
                              module.param_dtype, name='embedding')(images, (ph, pw))
  else:
    x = nn.Conv(module.hidden_size, (ph, pw), strides=(ph, pw), padding='VALID',
                dtype=module.dtype, param_dtype=module.param_dtype,
                name='embedding')(images.astype(module.dtype))
  b, gh, gw, d = x.shape
  return jnp.reshape(x, (b, gh * gw, d)), (gh, gw)


def make_encoder(module: nn.Module, grid: tuple[int, int], num_prefix: int,
                 table_prefix: Optional[int] = None, dynamic: bool = False) -> 'Encoder':
  """The `Transformer` encoder configured from a module with the ViT's fields (a DeiT lacks the
  variant fields layer_scale and fc_norm: their defaults apply); `dynamic` resamples the table to
  the input's grid even without dynamic_img_size (a call at another patch size)."""
  if module.dynamic_resize not in RESIZE_METHODS:
    raise ValueError(f'dynamic_resize {module.dynamic_resize!r} is not one of {RESIZE_METHODS}')
  return Encoder(
      num_layers=module.num_layers, mlp_dim=module.mlp_dim, num_heads=module.num_heads,
      posemb=module.posemb, grid=grid, num_prefix=num_prefix, dropout_rate=module.dropout_rate,
      attention_dropout_rate=module.attention_dropout_rate,
      stochastic_depth=module.stochastic_depth, attention_impl=module.attention_impl,
      remat=module.remat, scan=module.scan, act=module.act, table_prefix=table_prefix,
      posemb_grid=module.posemb_grid, dynamic_img_size=module.dynamic_img_size or dynamic,
      dynamic_resize=module.dynamic_resize, layer_scale=getattr(module, 'layer_scale', None),
      final_norm=not getattr(module, 'fc_norm', False), dtype=module.dtype,
      param_dtype=module.param_dtype, name='Transformer')


def intermediate_outputs(encoder: 'Encoder', x: jax.Array, grid: tuple[int, int], num_prefix: int,
                         indices: backbone.Indices, *, norm: bool, drop_prefix: bool, train: bool,
                         tokens: Optional[TokenInputs]) -> dict[str, list[jax.Array]]:
  """The backbone API's result: {'maps': [B, gh, gw, D] per index, 'prefix': [B, P, D] per index
  (absent with drop_prefix)}; see `VisionTransformer.__call__`."""
  if tokens is not None and tokens.keep is not None:
    raise ValueError('intermediates return the full patch grid; they cannot be used with '
                     'tokens.keep')
  take = backbone.take_indices(indices, encoder.num_layers, 'blocks')
  hidden = encoder(x, train=train, tokens=tokens, take=take, take_norm=norm)
  b = x.shape[0]
  return backbone.pack([h[:, num_prefix:].reshape(b, *grid, h.shape[-1]) for h in hidden],
                       [h[:, :num_prefix] for h in hidden], drop_prefix)


class VisionTransformer(nn.Module):
  """ViT classifier. See the module docstring for the equations and the parameter layout.

  Attributes:
    num_classes: logits per image; 0 or None builds no head (the model returns pre-logits features).
    patch_size: int or (ph, pw) pixels; the image height and width must be multiples of it.
    hidden_size, num_layers, num_heads, mlp_dim: D, L, heads, MLP hidden units.
    classifier: 'token' (class token), 'gap' (mean of the patch tokens after the final LayerNorm) or
      'map' (attention pooling head over the patch tokens).
    posemb: 'learned', 'sincos2d' or 'none'.
    representation_size: if set, a `pre_logits` Dense + tanh layer of this width before the head.
    head_zeroinit: zero the head kernel (the paper's fine-tuning recipe); head_bias_init: its bias.
    dropout_rate, attention_dropout_rate, stochastic_depth: regularisation (train=True only).
    dtype: computation dtype (bfloat16 for mixed precision); param_dtype: parameter dtype.
    remat: recompute block activations in the backward pass: True / 'full', or a policy name of
      `REMAT_POLICIES` ('dots_saveable', ...); scan: `nn.scan` over the blocks.
    attention_impl: 'auto' (default: cuDNN flash attention on NVIDIA GPUs where it applies, XLA's
      fused attention elsewhere), 'xla', 'cudnn', or None/'explicit' (plain softmax); see
      `attention.dot_product_attention`.
    act: 'gelu_tanh' (Google's checkpoints) or 'gelu' (exact; timm and Hugging Face).
    layer_scale, num_registers, no_embed_class, fc_norm: the later ViTs' options (module docstring);
      None / 0 / False is the paper's ViT.
    posemb_grid: the learned table's (gh, gw) when it is not the image's (a 37x37 DINOv2 table used
      at 224 px with dynamic_img_size); None: the image's at initialisation, read back off the
      table's shape (the image's grid, else a square) afterwards.
    dynamic_img_size: accept any image size (multiple of the patch) at call time: the learned table
      is resampled to the input's grid inside the call with `dynamic_resize` ('bilinear', scipy's
      corner-aligned zoom, 'bicubic', antialiased, or 'linear', half-pixel without antialiasing as
      FlexiViT: the checkpoint transfer's methods), so the result equals building the model at
      that size from the resampled checkpoint. False: another grid than the table's is an error.
  """
  num_classes: Optional[int]
  patch_size: Union[int, Sequence[int]]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  posemb: str = 'learned'
  representation_size: Optional[int] = None
  head_zeroinit: bool = True
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: Union[bool, str] = False
  scan: bool = False
  attention_impl: Optional[str] = 'auto'
  act: str = 'gelu_tanh'
  layer_scale: Optional[float] = None
  num_registers: int = 0
  no_embed_class: bool = False
  fc_norm: bool = False
  posemb_grid: Optional[Sequence[int]] = None
  dynamic_img_size: bool = False
  dynamic_resize: str = 'bilinear'

  @property
  def patch_hw(self) -> tuple[int, int]:
    return pair(self.patch_size)

  @property
  def num_prefix(self) -> int:
    return num_prefix_tokens(self.classifier, self.num_registers)

  def _add_prefix(self, x: jax.Array) -> jax.Array:
    """[B, N, D] patches -> [B, prefix + N, D]: the class token, then the registers."""
    b, _, d = x.shape
    parts = []
    if self.classifier == 'token':
      parts.append(self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype))
    if self.num_registers:
      # A random start: registers get no position embedding, so equal ones would stay equal.
      parts.append(self.param('registers', nn.initializers.normal(stddev=0.02),
                              (1, self.num_registers, d), self.param_dtype))
    if not parts:
      return x
    prefix = jnp.concatenate(parts, axis=1).astype(x.dtype)
    return jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])), x], axis=1)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_aux: bool = False,
               features: bool = False, tokens: Optional[TokenInputs] = None,
               return_weights: Optional[bool] = None,
               intermediates: Optional[backbone.Indices] = None, norm: bool = False,
               drop_prefix: bool = False, patch_size: Optional[Union[int, Sequence[int]]] = None):
    """Classifies images.

    Args:
      images: [B, H, W, C], any C, H and W multiples of the patch size; pixels roughly in [-1, 1].
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      return_aux: also return a dict with 'pre_logits' [B, D or representation_size], the token map
        'prefix_tokens' [B, P, D] (class token, then registers) and 'patch_tokens' [B, N, D] (after
        the final LayerNorm, or the last block with fc_norm; see `vit_jax.models.tokens`) and
        'attention_weights' [L, B, heads, T, T] float32 (T = prefix + prompts + patches) or None.
      features: return [feature map [B, H/ph, W/pw, D]] (the patch tokens after the final
        LayerNorm, one scale) instead of logits: the multi-scale interface every family shares.
      tokens: token-level inputs of a training objective (mask, kept patches, prompts).
      return_weights: compute the attention weights for aux (the explicit softmax, never a fused
        kernel); default: return_aux.
      intermediates: block indices (negative: from the end; an int n: the last n), the backbone
        API (`vit_jax.models.backbone`): return instead {'maps': [the patch tokens after each of
        these blocks as [B, H/ph, W/pw, D]], 'prefix': [the prefix tokens [B, P, D] after each]},
        in the order given; later blocks are not run (without scan).
      norm: with intermediates, pass each through the final norm (timm's norm=True; none with
        fc_norm, whose norm follows the pooling).
      drop_prefix: with intermediates, leave 'prefix' out.
      patch_size: run at this patch size instead of the model's (FlexiViT, a static argument: one
        compilation per size): the stored kernel PI-resized to it and the learned table resampled
        to the new grid, both inside the call with `dynamic_resize` (the kernel with
        `resize.patch_method` of it: 'linear', or 'bicubic'), which equals building the model at
        that patch size from the checkpoint transferred with the same method. Initialise at the
        model's own patch size.

    Returns:
      logits [B, num_classes] in `dtype` (or pre-logits when there is no head); with return_aux,
      (logits, aux); with intermediates, the dict above.
    """
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier {self.classifier!r} is not one of {CLASSIFIERS}')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb {self.posemb!r} is not one of {POSEMBS}')
    return_weights = return_aux if return_weights is None else return_weights
    patch_hw = self.patch_hw if patch_size is None else pair(patch_size)
    flexible = patch_hw != self.patch_hw
    if flexible and self.is_initializing():
      raise ValueError(f'initialise at the model\'s patch size {self.patch_hw}; patch_size='
                       f'{patch_size} is for calls with its parameters')
    x, (gh, gw) = embed_patches(self, images, patch_hw, self.patch_hw,
                                resize.patch_method(self.dynamic_resize) if flexible else 'linear')
    x = self._add_prefix(tokens_lib.edit_patches(x, tokens))
    b, _, d = x.shape
    prefix = self.num_prefix
    encoder = make_encoder(self, (gh, gw), prefix, 0 if self.no_embed_class else None, flexible)
    if intermediates is not None:
      return intermediate_outputs(encoder, x, (gh, gw), prefix, intermediates, norm=norm,
                                  drop_prefix=drop_prefix, train=train, tokens=tokens)
    x, weights = encoder(x, train=train, return_weights=return_weights, tokens=tokens)
    if features:
      if tokens is not None and tokens.keep is not None:
        raise ValueError('features=True returns the full patch grid; it cannot be used with '
                         'tokens.keep')
      return [jnp.reshape(x[:, prefix:], (b, gh, gw, d))]
    token_map = {'prefix_tokens': x[:, :prefix], 'patch_tokens': x[:, prefix:]}

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x[:, prefix:], axis=1)
    else:
      x = MAPHead(self.num_heads, self.mlp_dim, self.act, self.dtype, self.param_dtype,
                  name='MAPHead_0')(x[:, prefix:])
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='fc_norm')(x)

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits')(x))
    pre_logits = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=(nn.initializers.zeros if self.head_zeroinit
                                else nn.initializers.lecun_normal()),
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    if return_aux:
      return x, {'pre_logits': pre_logits, 'attention_weights': weights, **token_map}
    return x
