"""MAE: masked autoencoders (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

Per image, a random `mask_ratio` (0.75) of the patches is hidden: a uniform random permutation from
the step's key (so a seed fixes every mask), the first (1 - ratio) N patches kept. The encoder, a
plain model of this project, runs on the visible patches only (`TokenInputs.keep`, after its
position embedding): about a quarter of the full encoder's FLOPs at 75%. A small decoder of its own
width, depth and heads embeds the encoder's output tokens, puts a learned [mask] token at every
hidden position, adds its own fixed 2-D sin-cos position embedding and predicts every patch's
pixels; the loss is the mean squared error on the hidden patches only, against each patch's pixels
normalised by their own mean and variance (`norm_pix_loss`, the paper's best; off: the [-1, 1]
pixels as the model sees them).

The decoder lives under `objective/decoder` and is dropped when the encoder is fine-tuned
(`pretrained=`) or exported (timm, Hugging Face): the encoder is an ordinary model of its family.
Evaluation: the same masking (seeded by the run's seed and the batch index) on the evaluation
split; `eval_loss` is kept lowest.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import tokens as tokens_lib
from vit_jax.models.vit import LN_EPS, Encoder1DBlock, sincos_2d
from vit_jax.objectives.base import (Batch, Objective, model_params, own_params, patch_layout,
                                     to_unit, unpatchify)
from vit_jax.objectives.mpp import patchify


def random_keep(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> jax.Array:
  """int32 [B, K] indices of the visible patches, K = round((1 - ratio) N) (at least 1), sorted;
  a uniform random subset per image."""
  keep = max(1, int(round(num_patches * (1.0 - mask_ratio))))
  noise = jax.random.uniform(rng, (batch, num_patches))
  order = jnp.argsort(noise, axis=1)[:, :keep]
  return jnp.sort(order, axis=1).astype(jnp.int32)


def hidden_mask(keep: jax.Array, num_patches: int) -> jax.Array:
  """float32 [B, N]: 1 on the hidden patches, 0 on the kept ones."""
  visible = jnp.zeros((keep.shape[0], num_patches), jnp.float32)
  visible = jax.vmap(lambda v, k: v.at[k].set(1.0))(visible, keep)
  return 1.0 - visible


def normalized_pixels(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """[..., P] each patch minus its mean, over its standard deviation (MAE's norm_pix_loss)."""
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


class MaeDecoder(nn.Module):
  """Encoder tokens [B, prefix + K, D] of the kept patches -> pixel predictions [B, N, pixels].

  Parameters: `embed` (Dense D -> width), `mask_token` [width], `encoderblock_{i}` (ViT blocks, the
  same names as the encoder's), `decoder_norm`, `pred` (Dense width -> pixels).
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pixels: int
  grid: tuple[int, int]
  num_prefix: int

  @nn.compact
  def __call__(self, tokens: jax.Array, keep: jax.Array) -> jax.Array:
    b = tokens.shape[0]
    n = self.grid[0] * self.grid[1]
    x = nn.Dense(self.width, name='embed')(tokens.astype(jnp.float32))
    mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02), (self.width,))
    full = jnp.broadcast_to(mask_token, (b, n, self.width))
    full = jax.vmap(lambda f, k, v: f.at[k].set(v))(full, keep, x[:, self.num_prefix:])
    x = jnp.concatenate([x[:, :self.num_prefix], full], axis=1)
    pe = sincos_2d(*self.grid, self.width)
    pe = np.concatenate([np.zeros((1, self.num_prefix, self.width), np.float32), pe], axis=1)
    x = x + pe
    for i in range(self.depth):
      x, _ = Encoder1DBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                            name=f'encoderblock_{i}')(x, jnp.zeros(()))
    x = nn.LayerNorm(epsilon=LN_EPS, name='decoder_norm')(x)
    return nn.Dense(self.pixels, name='pred')(x[:, self.num_prefix:])


class MaskedAutoencoder(Objective):
  """MAE (see the module docstring)."""
  name = 'mae'
  config_key = 'mae'
  needs = (tokens_lib.KEEP, tokens_lib.TOKEN_MAP)
  uses_labels = False
  best_metric, best_mode = 'eval_loss', 'min'
  summary = ('masked autoencoder: the encoder sees 25% of the patches, a small decoder '
             'reconstructs the pixels of the rest')

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    # The paper's decoder for ViT-B/L/H: width 512, 8 blocks of 16 heads, MLP 2048.
    return {'mask_ratio': 0.75, 'norm_pix_loss': True, 'decoder_width': 512, 'decoder_depth': 8,
            'decoder_heads': 16, 'decoder_mlp_dim': 2048}

  @classmethod
  def check_config(cls, config, family) -> None:
    super().check_config(config, family)
    block = {**cls.defaults(), **dict(config.get('mae') or {})}
    ratio = block['mask_ratio']
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
      raise ValueError(f'mae.mask_ratio must be in (0, 1), got {ratio!r}')
    if not isinstance(block['norm_pix_loss'], bool):
      raise ValueError(f'mae.norm_pix_loss must be True or False, got {block["norm_pix_loss"]!r}')
    for key in ('decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_dim'):
      if not (isinstance(block[key], int) and block[key] > 0):
        raise ValueError(f'mae.{key} must be a positive integer, got {block[key]!r}')
    if block['decoder_width'] % block['decoder_heads']:
      raise ValueError(f'mae.decoder_width {block["decoder_width"]} is not divisible by '
                       f'mae.decoder_heads {block["decoder_heads"]}')
    if block['decoder_width'] % 4:
      raise ValueError('mae.decoder_width must be a multiple of 4 (its sin-cos position '
                       f'embedding), got {block["decoder_width"]}')

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self.cfg = {**self.defaults(), **dict(self.block())}
    self.num_prefix, self.grid, self.patch_hw = patch_layout(self.family, self.fields, config)
    self.num_patches = self.grid[0] * self.grid[1]

  def head_classes(self) -> Optional[int]:
    return None

  def decoder(self, channels: int) -> MaeDecoder:
    c = self.cfg
    return MaeDecoder(c['decoder_width'], c['decoder_depth'], c['decoder_heads'],
                      c['decoder_mlp_dim'], self.patch_hw[0] * self.patch_hw[1] * channels,
                      self.grid, self.num_prefix)

  def init_own(self, model, rng, input_shape) -> dict[str, Any]:
    x = jnp.zeros((1, *input_shape[1:]), jnp.float32)
    init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    _, aux = jax.eval_shape(lambda v: model.apply(v, x, return_aux=True, return_weights=False), init)
    d = aux['patch_tokens'].shape[-1]
    keep = jnp.arange(self.num_patches, dtype=jnp.int32)[None]
    tokens = jnp.zeros((1, self.num_prefix + self.num_patches, d), jnp.float32)
    return {'decoder': self.decoder(input_shape[-1]).init(rng, tokens, keep)['params']}

  def analytic_macs(self, model_macs: int) -> int:
    """The encoder on prefix + K of prefix + N tokens (its matmuls scale with the tokens; the
    quadratic attention term is counted linearly, an overestimate under 1% at ViT-B/16's size) plus
    the decoder's blocks on all of them and its two projections."""
    n, p = self.num_patches, self.num_prefix
    k = max(1, int(round(n * (1.0 - self.cfg['mask_ratio']))))
    c = self.cfg
    t, w, m = n + p, c['decoder_width'], c['decoder_mlp_dim']
    decoder = c['decoder_depth'] * (4 * t * w * w + 2 * t * t * w + 2 * t * w * m)
    pixels = self.patch_hw[0] * self.patch_hw[1] * self.config['channels']
    d = self.fields.get('hidden_size', w)
    return int(model_macs * (p + k) / (p + n) + decoder + t * d * w + n * w * pixels)

  def encode(self, model, params, extras, images, keep, *, train: bool, rng: Any = None):
    """The encoder's output tokens [B, prefix + K, D] of the kept patches."""
    rngs = {'dropout': rng} if train else {}
    _, aux = model.apply({'params': model_params(params, extras)}, images, train=train, rngs=rngs,
                         tokens=tokens_lib.TokenInputs(keep=keep), return_aux=True,
                         return_weights=False)
    return jnp.concatenate([aux['prefix_tokens'], aux['patch_tokens']], axis=1)

  def reconstruct(self, model, params, extras, images, rng, *, train: bool = False,
                  dropout_rng: Any = None) -> dict[str, jax.Array]:
    """{'pred' [B, N, P] (normalised pixels with norm_pix_loss), 'target' [B, N, P], 'hidden'
    [B, N] float32}; P = ph * pw * C."""
    keep = random_keep(rng, images.shape[0], self.num_patches, self.cfg['mask_ratio'])
    encoded = self.encode(model, params, extras, images, keep, train=train, rng=dropout_rng)
    pred = self.decoder(images.shape[-1]).apply({'params': own_params(params)['decoder']},
                                                encoded, keep)
    target = patchify(images.astype(jnp.float32), self.patch_hw)
    if self.cfg['norm_pix_loss']:
      target = normalized_pixels(target)
    return {'pred': pred, 'target': target, 'hidden': hidden_mask(keep, self.num_patches)}

  def visualize(self, model, params, images, rng):
    """The input, the visible patches (hidden ones grey), the reconstruction of every patch and the
    reconstruction of the hidden ones pasted among the visible (with norm_pix_loss, each predicted
    patch is shown with its true patch's mean and spread, as the paper's figures)."""
    out = self.reconstruct(model, params, {}, images, rng)
    c = images.shape[-1]
    x01 = to_unit(images)
    patches = np.asarray(patchify(jnp.asarray(x01), self.patch_hw))
    pred = np.asarray(out['pred'], np.float32)
    if self.cfg['norm_pix_loss']:  # back to pixels with the true patch's statistics (in [0, 1])
      mean, std = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
      pred = pred * std + mean
    else:
      pred = (pred + 1.0) / 2.0
    pred = np.clip(pred, 0.0, 1.0)
    hidden = np.asarray(out['hidden'])[..., None] > 0
    back = lambda p: unpatchify(p, self.grid, self.patch_hw, c)
    ratio = self.cfg['mask_ratio']
    return {'title': 'MAE reconstruction',
            'caption': (f'input; the {1 - ratio:.0%} of patches the encoder saw; the decoder\'s '
                        'prediction of every patch; the hidden patches predicted, the visible ones '
                        'as they are'),
            'columns': [('input', x01), ('visible', back(np.where(hidden, 0.5, patches))),
                        ('reconstruction', back(pred)),
                        ('reconstruction + visible', back(np.where(hidden, pred, patches)))]}

  def loss(self, model, params, extras, batch: Batch, rng):
    k_mask, k_drop = jax.random.split(rng)
    out = self.reconstruct(model, params, extras, batch['image'], k_mask, train=True,
                           dropout_rng=k_drop)
    per_patch = jnp.mean(jnp.square(out['pred'] - out['target']), axis=-1)
    return jnp.sum(per_patch * out['hidden']) / jnp.maximum(jnp.sum(out['hidden']), 1.0), {}

  def eval_sums(self, model, params, extras, batch: Batch, rng):
    out = self.reconstruct(model, params, extras, batch['image'], rng)
    per_patch = jnp.mean(jnp.square(out['pred'] - out['target']), axis=-1)
    weight = out['hidden'] * batch['mask'].astype(jnp.float32)[:, None]
    return {'loss': jnp.sum(per_patch * weight), 'patches': jnp.sum(weight),
            'count': jnp.sum(batch['mask'].astype(jnp.float32))}

  def eval_summary(self, totals) -> dict[str, float]:
    return {'eval_loss': float(totals['loss']) / max(float(totals['patches']), 1.0),
            'eval_count': int(totals['count'])}


OBJECTIVE = MaskedAutoencoder
