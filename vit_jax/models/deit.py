"""DeiT's distilled Vision Transformer (Touvron et al., 2021, "Training data-efficient image
transformers & distillation through attention"), in Flax linen.

    z_0 = [x_class; x_dist; x_p^1 E; ...; x_p^N E] + E_pos       (two prefix tokens)
    z_L = the ViT's pre-LN encoder (vit_jax.models.vit.Encoder)
    y_cls = head(z_L^0),  y_dist = head_dist(z_L^1)
    inference: (y_cls + y_dist) / 2; distillation training: y_cls against the labels, y_dist against
    the teacher (vit_jax.train.step)

Parameter paths are the ViT's (`embedding`, `cls`, `Transformer/...`, `head`) plus `dist_token`
[1, 1, D] and `head_dist`; the position table `Transformer/posembed_input/pos_embedding` is
[1, 2 + N, D] (class row, distillation row, then the patches: timm's `VisionTransformerDistilled`
layout).

Outputs: `train` only switches dropout and stochastic depth on and never changes what is returned,
so a DeiT trains, evaluates and predicts like any other model (as timm's default,
`distilled_training=False`: both heads trained on their average). `return_both=True` returns the
two heads' logits (y_cls, y_dist) separately, which is what distillation needs.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import tokens as tokens_lib
from vit_jax.models.tokens import TokenInputs
from vit_jax.models.vit import POSEMBS, embed_patches, make_encoder, pair

Dtype = Any
NUM_PREFIX = 2  # the class token and the distillation token


class DistilledVisionTransformer(nn.Module):
  """DeiT classifier: a ViT with a distillation token and a second head.

  Attributes:
    num_classes: logits per head; 0 or None builds no heads (the model returns the mean of the two
      prefix tokens' features, as timm's pre-logits).
    patch_size, hidden_size, num_layers, num_heads, mlp_dim: as the ViT's.
    classifier: always 'token' (the heads read the class and distillation tokens); kept as a field
      so that ViT-shaped configs and metadata read alike.
    posemb: 'learned', 'sincos2d' (zero on both prefix tokens) or 'none'.
    head_zeroinit, head_bias_init: initialisation of both heads.
    dropout_rate, attention_dropout_rate, stochastic_depth, dtype, param_dtype, remat, scan,
      attention_impl: as the ViT's.
    act: 'gelu' (exact erf; timm's DeiT, the default) or 'gelu_tanh'.
  """
  num_classes: Optional[int]
  patch_size: Union[int, Sequence[int]]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  posemb: str = 'learned'
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
  act: str = 'gelu'

  @property
  def patch_hw(self) -> tuple[int, int]:
    return pair(self.patch_size)

  def _head(self, name: str) -> nn.Dense:
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=(nn.initializers.zeros if self.head_zeroinit
                                 else nn.initializers.lecun_normal()),
                    bias_init=nn.initializers.constant(self.head_bias_init), name=name)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_aux: bool = False,
               features: bool = False, return_both: bool = False,
               tokens: Optional[TokenInputs] = None, return_weights: Optional[bool] = None):
    """Classifies images.

    Args:
      images: [B, H, W, C], H and W multiples of the patch size; pixels roughly in [-1, 1].
      train: enables dropout and stochastic depth (needs a 'dropout' rng).
      return_aux: also return a dict with 'pre_logits' [B, D] (mean of the two prefix tokens), the
        token map 'prefix_tokens' [B, 2, D] and 'patch_tokens' [B, N, D] (`vit_jax.models.tokens`)
        and 'attention_weights' [L, B, heads, T, T] float32 or None (T = 2 + prompts + N).
      features: return [the patch tokens after the final LayerNorm, [B, H/ph, W/pw, D]].
      return_both: return (class-head logits, distillation-head logits), each [B, num_classes]
        (without heads: the two tokens' features [B, D]) instead of their mean.
      tokens: token-level inputs of a training objective (mask, kept patches, prompts).
      return_weights: compute the attention weights for aux; default: return_aux.

    Returns:
      logits [B, num_classes] = (head(class token) + head_dist(distillation token)) / 2, in `dtype`;
      a pair with return_both; with return_aux, (that, aux).
    """
    if self.classifier != 'token':
      raise ValueError(f'a DeiT classifies its class and distillation tokens: classifier must be '
                       f"'token', got {self.classifier!r}")
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb {self.posemb!r} is not one of {POSEMBS}')
    return_weights = return_aux if return_weights is None else return_weights
    x, (gh, gw) = embed_patches(self, images, self.patch_hw)
    x = tokens_lib.edit_patches(x, tokens)
    b, _, d = x.shape
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype)
    # A random start keeps the two prefix tokens apart from the first step (timm: trunc_normal .02).
    dist = self.param('dist_token', nn.initializers.normal(stddev=0.02), (1, 1, d),
                      self.param_dtype)
    prefix = jnp.concatenate([cls, dist], axis=1).astype(x.dtype)
    x = jnp.concatenate([jnp.tile(prefix, (b, 1, 1)), x], axis=1)
    x, weights = make_encoder(self, (gh, gw), NUM_PREFIX)(
        x, train=train, return_weights=return_weights, tokens=tokens)
    if features:
      if tokens is not None and tokens.keep is not None:
        raise ValueError('features=True returns the full patch grid; it cannot be used with '
                         'tokens.keep')
      return [jnp.reshape(x[:, NUM_PREFIX:], (b, gh, gw, d))]
    token_map = {'prefix_tokens': x[:, :NUM_PREFIX], 'patch_tokens': x[:, NUM_PREFIX:]}

    x_cls, x_dist = x[:, 0], x[:, 1]
    pre_logits = (x_cls + x_dist) / 2
    if self.num_classes:
      x_cls, x_dist = self._head('head')(x_cls), self._head('head_dist')(x_dist)
    out = (x_cls, x_dist) if return_both else (x_cls + x_dist) / 2
    if return_aux:
      return out, {'pre_logits': pre_logits, 'attention_weights': weights, **token_map}
    return out
