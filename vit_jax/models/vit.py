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
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import tokens as tokens_lib
from vit_jax.models.attention import MultiHeadDotProductAttention, rows
from vit_jax.models.tokens import TokenInputs

Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map')
POSEMBS = ('learned', 'sincos2d', 'none')
ACTIVATIONS = ('gelu', 'gelu_tanh')
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
LN_EPS = 1e-6


def pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
  """An int or an (h, w) pair -> (h, w) ints (patch and window sizes of every model family)."""
  return (int(value), int(value)) if np.ndim(value) == 0 else (int(value[0]), int(value[1]))


def num_prefix_tokens(classifier: str) -> int:
  """Tokens before the patch tokens in the sequence (1 for the class token, else 0)."""
  return 1 if classifier == 'token' else 0


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

  `learned`: a parameter `pos_embedding` [1, prefix + h*w, D] (the paper's 1-D embedding, class-token
  row included, N(0, 0.02) init). `sincos2d`: fixed, zero on prefix tokens. `none`: identity.
  """
  kind: str
  grid: tuple[int, int]
  num_prefix: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, n, d = x.shape
    if self.kind == 'learned':
      pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, n, d),
                      self.param_dtype)
    elif self.kind == 'sincos2d':
      pe = sincos_2d(*self.grid, d)
      pe = np.concatenate([np.zeros((1, self.num_prefix, d), np.float32), pe], axis=1)
    elif self.kind == 'none':
      return x
    else:
      raise ValueError(f'posemb {self.kind!r} is not one of {POSEMBS}')
    return x + jnp.asarray(pe, x.dtype)


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


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
  """Stochastic depth: zero a residual branch per example with probability `rate` (a float or a
  traced scalar), rescale the rest. Every family's blocks use this one."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Encoder1DBlock(nn.Module):
  """One pre-LN transformer block; call(x, drop_rate, prompt) -> (x, attention weights or None).

  The (carry, per-layer inputs) -> (carry, per-layer output) signature lets `nn.scan` stack the
  blocks. `prompt` [P, D] (deep visual prompt tuning, `vit_jax.models.tokens`) replaces the P tokens
  after the first `prompt_offset` before the block runs; None leaves the sequence as it is.
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: jax.Array, prompt: Optional[jax.Array] = None):
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    use_drop_path = self.stochastic_depth and not self.deterministic
    x = tokens_lib.set_prompts(x, prompt, self.prompt_offset, inserted=True)

    y = norm('LayerNorm_0')(rows(x, self.dtype)).reshape(x.shape)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        dropout_rate=self.attention_dropout_rate, implementation=self.attention_impl,
        name='MultiHeadDotProductAttention_1')(
            y, deterministic=self.deterministic, return_weights=self.return_weights)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
    if use_drop_path:
      y = drop_path(y, drop_rate, self.make_rng('dropout'))
    x = x + y

    y = norm('LayerNorm_2')(rows(x, self.dtype)).reshape(x.shape)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.act, self.dtype, self.param_dtype,
                 name='MlpBlock_3')(
        y, deterministic=self.deterministic)
    if use_drop_path:
      y = drop_path(y, drop_rate, self.make_rng('dropout'))
    return x + y, weights


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and the final LayerNorm (`encoder_norm`)."""
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_weights: bool = False,
               tokens: Optional[TokenInputs] = None):
    """x: [B, N, D] tokens (prefix first). Returns ([B, N', D], weights [L, B, H, T, T] float32 or
    None): with `tokens.keep` N' = prefix + K, else N; prompts are dropped from the output (T counts
    them)."""
    x = AddPositionEmbs(self.posemb, self.grid, self.num_prefix, self.param_dtype,
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
                  act=self.act, prompt_offset=self.num_prefix, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    block = remat_block(Encoder1DBlock, self.remat, prevent_cse=not self.scan)
    # Deep prompts: block i's prompt slots are overwritten by prompts[i] (i = 0 is the insertion).
    deep = tokens is not None and tokens.deep()
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=0, length=self.num_layers)
      x, weights = stack(name='encoderblock', **kwargs)(x, rates, tokens.prompts if deep else None)
    else:
      all_weights = []
      for i in range(self.num_layers):
        prompt = tokens.prompts[i] if deep and i else None
        x, w = block(name=f'encoderblock_{i}', **kwargs)(x, rates[i], prompt)
        all_weights.append(w)
      weights = jnp.stack(all_weights) if return_weights else None
    x = tokens_lib.drop_prompts(x, self.num_prefix, tokens)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='encoder_norm')(x)
    return x, weights


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision `MAPHead`): a learned probe attends over the tokens."""
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


def embed_patches(module: nn.Module, images: jax.Array, patch_hw: tuple[int, int]
                  ) -> tuple[jax.Array, tuple[int, int]]:
  """The patch embedding `embedding` (a conv of stride = patch) as tokens: ([B, gh*gw, D], (gh, gw)).

  Call from a compact method of a module with ViT fields (hidden_size, dtype, param_dtype): the conv
  is created in that module's scope, where Google's checkpoints keep it.
  """
  ph, pw = patch_hw
  _, h, w, _ = images.shape
  if h % ph or w % pw:
    raise ValueError(f'image size {h}x{w} is not divisible by the patch size {ph}x{pw}')
  x = nn.Conv(module.hidden_size, (ph, pw), strides=(ph, pw), padding='VALID', dtype=module.dtype,
              param_dtype=module.param_dtype, name='embedding')(images.astype(module.dtype))
  b, gh, gw, d = x.shape
  return jnp.reshape(x, (b, gh * gw, d)), (gh, gw)


def make_encoder(module: nn.Module, grid: tuple[int, int], num_prefix: int) -> 'Encoder':
  """The `Transformer` encoder configured from a module with the ViT's fields."""
  return Encoder(
      num_layers=module.num_layers, mlp_dim=module.mlp_dim, num_heads=module.num_heads,
      posemb=module.posemb, grid=grid, num_prefix=num_prefix, dropout_rate=module.dropout_rate,
      attention_dropout_rate=module.attention_dropout_rate,
      stochastic_depth=module.stochastic_depth, attention_impl=module.attention_impl,
      remat=module.remat, scan=module.scan, act=module.act, dtype=module.dtype,
      param_dtype=module.param_dtype, name='Transformer')


class VisionTransformer(nn.Module):
  """ViT classifier. See the module docstring for the equations and the parameter layout.

  Attributes:
    num_classes: logits per image; 0 or None builds no head (the model returns pre-logits features).
    patch_size: int or (ph, pw) pixels; the image height and width must be multiples of it.
    hidden_size, num_layers, num_heads, mlp_dim: D, L, heads, MLP hidden units.
    classifier: 'token' (class token), 'gap' (mean of the tokens after the final LayerNorm) or 'map'
      (attention pooling head).
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

  @property
  def patch_hw(self) -> tuple[int, int]:
    return pair(self.patch_size)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_aux: bool = False,
               features: bool = False, tokens: Optional[TokenInputs] = None,
               return_weights: Optional[bool] = None):
    """Classifies images.

    Args:
      images: [B, H, W, C], any C, H and W multiples of the patch size; pixels roughly in [-1, 1].
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      return_aux: also return a dict with 'pre_logits' [B, D or representation_size], the token map
        'prefix_tokens' [B, P, D] and 'patch_tokens' [B, N, D] (after the final LayerNorm; see
        `vit_jax.models.tokens`) and 'attention_weights' [L, B, heads, T, T] float32 (T = prefix +
        prompts + patches) or None.
      features: return [feature map [B, H/ph, W/pw, D]] (the patch tokens after the final
        LayerNorm, one scale) instead of logits: the multi-scale interface every family shares.
      tokens: token-level inputs of a training objective (mask, kept patches, prompts).
      return_weights: compute the attention weights for aux (the explicit softmax, never a fused
        kernel); default: return_aux.

    Returns:
      logits [B, num_classes] in `dtype` (or pre-logits when there is no head); with return_aux,
      (logits, aux).
    """
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier {self.classifier!r} is not one of {CLASSIFIERS}')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb {self.posemb!r} is not one of {POSEMBS}')
    return_weights = return_aux if return_weights is None else return_weights
    x, (gh, gw) = embed_patches(self, images, self.patch_hw)
    x = tokens_lib.edit_patches(x, tokens)
    b, _, d = x.shape
    prefix = num_prefix_tokens(self.classifier)
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)

    x, weights = make_encoder(self, (gh, gw), prefix)(
        x, train=train, return_weights=return_weights, tokens=tokens)
    if features:
      if tokens is not None and tokens.keep is not None:
        raise ValueError('features=True returns the full patch grid; it cannot be used with '
                         'tokens.keep')
      return [jnp.reshape(x[:, prefix:], (b, gh, gw, d))]
    token_map = {'prefix_tokens': x[:, :prefix], 'patch_tokens': x[:, prefix:]}

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(self.num_heads, self.mlp_dim, self.act, self.dtype, self.param_dtype,
                  name='MAPHead_0')(x)

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
