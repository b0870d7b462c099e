"""MLP-Mixer of "MLP-Mixer: An all-MLP Architecture for Vision" (Tolstikhin et al., 2021), in Flax linen.

    X_0 = patches(x) E                                         (stem: p x p conv, stride p) [B, S, C]
    U   = X + W_2 σ(W_1 LN(X)^T)^T                             (token mixing, across the S tokens)
    Y   = U + W_4 σ(W_3 LN(U))                                 (channel mixing, across the C channels)
    y   = mean_S LN(X_L)  ->  head                             (global average pooling)

σ is GELU. Parameter paths are a file format: they are exactly those of Google's released Mixer
checkpoints (google-research/vision_transformer `models_mixer.py`): `stem`, `MixerBlock_{i}/
{LayerNorm_0, token_mixing/Dense_0, token_mixing/Dense_1, LayerNorm_1, channel_mixing/Dense_0,
channel_mixing/Dense_1}`, `pre_head_layer_norm`, `head`. The token-mixing MLP's first kernel is
[S, tokens_mlp_dim], so the parameters fix the number of tokens S = (H/p)(W/p): a Mixer runs only at
the token count it was built for (`dynamic_img_size=True` is refused, naming this reason; checkpoint
transfer can resample the token-mixing weights on request, `vit_jax.families.mixer`).

Backbone API (`vit_jax.models.backbone`): `intermediates=(i, ...)` indexes the blocks and returns
each block's output as a [B, H/p, W/p, C] map, with `norm=True` through `pre_head_layer_norm` (as
timm's `forward_intermediates(norm=True)`, which norms every intermediate); no prefix tokens.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import backbone
from vit_jax.models.vit import ACTIVATIONS, drop_path, gelu, pair, remat_block

Dtype = Any

LN_EPS = 1e-6


class MlpBlock(nn.Module):
  """Dense_0 -> GELU -> dropout -> Dense_1 (back to the input width) -> dropout, on the last axis."""
  mlp_dim: int
  act: str = 'gelu_tanh'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x: [..., F] -> [..., F]."""
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    y = gelu(dense(self.mlp_dim, 'Dense_0')(x), self.act)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class MixerBlock(nn.Module):
  """One Mixer layer: token mixing then channel mixing, each pre-LayerNorm and residual.

  `drop_rate` is this block's stochastic-depth rate (used only when not deterministic).
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  act: str = 'gelu_tanh'
  dropout_rate: float = 0.0
  drop_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, S, C] -> [B, S, C]."""
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    mlp = lambda dim, name: MlpBlock(dim, self.act, self.dropout_rate, self.dtype,
                                     self.param_dtype, name=name)
    use_drop_path = self.drop_rate > 0 and not self.deterministic
    rate = jnp.asarray(self.drop_rate, jnp.float32)

    # Token mixing: the MLP acts on the token axis, so swap it to the last position and back.
    y = jnp.swapaxes(norm('LayerNorm_0')(x), 1, 2)
    y = jnp.swapaxes(mlp(self.tokens_mlp_dim, 'token_mixing')(
        y, deterministic=self.deterministic), 1, 2)
    if use_drop_path:
      y = drop_path(y, rate, self.make_rng('dropout'))
    x = x + y

    y = mlp(self.channels_mlp_dim, 'channel_mixing')(norm('LayerNorm_1')(x),
                                                      deterministic=self.deterministic)
    if use_drop_path:
      y = drop_path(y, rate, self.make_rng('dropout'))
    return x + y


class MlpMixer(nn.Module):
  """MLP-Mixer classifier. See the module docstring for the equations and the parameter layout.

  Attributes:
    num_classes: logits per image; 0 or None builds no head (the model returns pooled features [B, C]).
    patch_size: int or (ph, pw) pixels; the image height and width must be multiples of it.
    num_blocks, hidden_dim: L and C.
    tokens_mlp_dim, channels_mlp_dim: hidden units of the token-mixing and channel-mixing MLPs.
    act: 'gelu_tanh' (Google's released checkpoints) or 'gelu' (exact; timm's MlpMixer).
    stochastic_depth: drop-path rate of the last block, growing linearly from 0 at the first
      (the ViT/DeiT rule; timm uses one constant rate for every block).
    dropout_rate: dropout inside both MLPs (after the GELU and after Dense_1).
    head_zeroinit: zero the head kernel (Google's recipe); otherwise LeCun normal.
    dtype: computation dtype (bfloat16 for mixed precision); param_dtype: parameter dtype.
    remat: recompute each block's activations in the backward pass (True, or a policy name of
      `vit.REMAT_POLICIES`).
    dynamic_img_size: must stay False: the token-mixing MLPs fix the token count (a clear error
      says so; the field exists so that a configuration asking every family for it is answered).
  """
  num_classes: Optional[int]
  patch_size: Union[int, Sequence[int]]
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  act: str = 'gelu_tanh'
  stochastic_depth: float = 0.0
  dropout_rate: float = 0.0
  head_zeroinit: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: Union[bool, str] = False
  dynamic_img_size: bool = False

  @property
  def patch_hw(self) -> tuple[int, int]:
    return pair(self.patch_size)

  def _check_token_count(self, n: int, grid: tuple[int, int]) -> None:
    """The token-mixing kernels are [S, tokens_mlp_dim]: other S cannot use these parameters."""
    if self.is_initializing() or not self.has_variable('params', 'MixerBlock_0'):
      return
    kernel = self.variables['params']['MixerBlock_0']['token_mixing']['Dense_0']['kernel']
    if kernel.shape[0] != n:
      ph, pw = self.patch_hw
      raise ValueError(
          f'these Mixer parameters mix {kernel.shape[0]} tokens, but the images give {n} '
          f'({grid[0]}x{grid[1]} patches of {ph}x{pw} px); the token-mixing MLP is tied to the '
          f'token count, so use images of the size the parameters were trained for')

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, features: bool = False,
               intermediates: Optional[backbone.Indices] = None, norm: bool = False,
               drop_prefix: bool = False):
    """Classifies images.

    Args:
      images: [B, H, W, C_in], H and W multiples of the patch size; pixels roughly in [-1, 1].
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      features: return [token map [B, H/p, W/p, C]] (after the pre-head LayerNorm) instead.
      intermediates: block indices (negative from the end; an int n: the last n): return the
        backbone dict of `vit_jax.models.backbone` instead, 'maps' [B, H/p, W/p, C] after each of
        those blocks, 'prefix' [B, 0, C] each (a Mixer has no prefix tokens).
      norm: with `intermediates`, pass each map through `pre_head_layer_norm` (timm's norm=True).
      drop_prefix: with `intermediates`, leave 'prefix' out.

    Returns:
      logits [B, num_classes] in `dtype` (pooled features [B, C] without a head), with `features`
      a list holding the one token map, with `intermediates` the backbone dict.
    """
    if self.dynamic_img_size:
      raise ValueError(
          'MLP-Mixer cannot take dynamic_img_size=True: its token-mixing MLPs hold one weight per '
          'token position (kernels [S, tokens_mlp_dim]), so it runs only at the token count it was '
          'built for; resize the images to that size, or fine-tune at the new size from a '
          'checkpoint with posemb_resize=bilinear (which resamples the token-mixing weights)')
    if features and intermediates is not None:
      raise ValueError('give either features=True or intermediates=..., not both')
    take = (None if intermediates is None
            else backbone.take_indices(intermediates, self.num_blocks, 'blocks'))
    if self.act not in ACTIVATIONS:
      raise ValueError(f'act {self.act!r} is not one of {ACTIVATIONS}')
    ph, pw = self.patch_hw
    _, h, w, _ = images.shape
    if h % ph or w % pw:
      raise ValueError(f'image size {h}x{w} is not divisible by the patch size {ph}x{pw}')
    x = nn.Conv(self.hidden_dim, (ph, pw), strides=(ph, pw), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='stem')(images.astype(self.dtype))
    b, gh, gw, c = x.shape
    self._check_token_count(gh * gw, (gh, gw))
    x = jnp.reshape(x, (b, gh * gw, c))

    # Python floats, so each block's rate is static (and remat needs no traced arguments).
    rates = np.linspace(0.0, self.stochastic_depth, self.num_blocks) if self.num_blocks else []
    block = remat_block(MixerBlock, self.remat)
    final_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                              name='pre_head_layer_norm')
    outs = []
    for i in range(self.num_blocks):
      x = block(self.tokens_mlp_dim, self.channels_mlp_dim, act=self.act,
                dropout_rate=self.dropout_rate, drop_rate=float(rates[i]), deterministic=not train,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f'MixerBlock_{i}')(x)
      outs.append(x)
    if take is not None:
      maps = [jnp.reshape(final_norm(outs[i]) if norm else outs[i], (b, gh, gw, c)) for i in take]
      return backbone.pack(maps, [backbone.no_prefix(m) for m in maps], drop_prefix)
    x = final_norm(x)
    if features:
      return [jnp.reshape(x, (b, gh, gw, c))]
    x = jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=(nn.initializers.zeros if self.head_zeroinit
                                else nn.initializers.lecun_normal()), name='head')(x)
    return x
