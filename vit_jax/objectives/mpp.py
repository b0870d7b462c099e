"""Masked patch prediction: the ViT paper's self-supervision (Dosovitskiy et al., 2021, §4.6 and
Appendix B.1.2), which gave ViT-B/16 79.9% on ImageNet, 2 points above training from scratch.

Each patch is corrupted with probability `corrupt` (0.5); a corrupted patch's embedding is replaced
by a learned [mask] embedding (probability `mask`, 0.8), by the embedding of another patch of the
same image drawn uniformly (`random`, 0.1), or kept as it is (the rest, 0.1). The model predicts,
from each corrupted patch's output token, its
  mean_color  3-bit mean colour: each channel's mean in [0, 1] quantised to 2^bits levels, one class
              of (2^bits)^C (512 for RGB): softmax cross-entropy (the paper's default);
  downsized   the patch averaged down to `downsize` x `downsize` cells, each a 3-bit colour class:
              downsize^2 cross-entropies of (2^bits)^C classes, averaged;
  pixels      every pixel of the patch (in the model's [-1, 1] input scale): mean squared error.
The loss averages over the corrupted patches of the batch only. The objective owns a [mask]
embedding [D] and a linear prediction head on the output tokens (`objective/mask_embedding`,
`objective/head`); fine-tuning from such a checkpoint (`pretrained=`) drops both and names them.
Labels are never read: any dataset trains, its labels ignored, and so does a folder of unlabelled
images. Evaluation: the same corruption (seeded by the run's seed and the batch index) over the
evaluation split; `eval_loss` (kept lowest) and, for the class targets, `eval_accuracy`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.models import tokens as tokens_lib
from vit_jax.objectives.base import (Batch, Objective, model_params, own_params, patch_layout,
                                     to_unit, token_width, unpatchify)

TARGETS = ('mean_color', 'downsized', 'pixels')


def patchify(images: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, (H/ph) * (W/pw), ph * pw * C], patches in row-major grid order (the order
  of a ViT's patch tokens), pixels row-major then channel within a patch."""
  b, h, w, c = images.shape
  ph, pw = patch_hw
  x = images.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def corrupt(rng: jax.Array, shape: tuple[int, int], rate: float = 0.5, p_mask: float = 0.8,
            p_random: float = 0.1) -> dict[str, jax.Array]:
  """The paper's corruption of [B, N] patches: {'corrupted', 'mask' (replaced by the [mask]
  embedding), 'random' (replaced by another patch): bool [B, N]; 'source': int32 [B, N], the patch
  whose embedding each position takes (itself unless 'random')}. Independent draws per patch."""
  b, n = shape
  k_corrupt, k_kind, k_other = jax.random.split(rng, 3)
  corrupted = jax.random.bernoulli(k_corrupt, rate, (b, n))
  u = jax.random.uniform(k_kind, (b, n))
  mask = corrupted & (u < p_mask)
  random = corrupted & (u >= p_mask) & (u < p_mask + p_random)
  # Another patch, uniform over the other n - 1: an offset in [1, n) from this one.
  other = (jnp.arange(n)[None] + jax.random.randint(k_other, (b, n), 1, max(n, 2))) % n
  source = jnp.where(random, other, jnp.arange(n)[None]).astype(jnp.int32)
  return {'corrupted': corrupted, 'mask': mask, 'random': random, 'source': source}


def color_classes(x01: jax.Array, bits: int) -> jax.Array:
  """[..., C] colours in [0, 1] -> int32 [...] class: each channel quantised to 2^bits levels,
  the first channel most significant."""
  levels = 2 ** bits
  q = jnp.clip(jnp.floor(x01 * levels), 0, levels - 1).astype(jnp.int32)
  c = q.shape[-1]
  weights = levels ** jnp.arange(c - 1, -1, -1, dtype=jnp.int32)
  return jnp.sum(q * weights, axis=-1)


def targets(images: jax.Array, patch_hw: tuple[int, int], kind: str = 'mean_color', bits: int = 3,
            downsize: int = 4) -> jax.Array:
  """Per-patch targets of images [B, H, W, C] in [-1, 1]: mean_color int32 [B, N]; downsized int32
  [B, N, downsize^2] (cells row-major); pixels float32 [B, N, ph * pw * C]."""
  images = images.astype(jnp.float32)
  ph, pw = patch_hw
  c = images.shape[-1]
  if kind == 'pixels':
    return patchify(images, patch_hw)
  x01 = (patchify(images, patch_hw).reshape(*images.shape[:1], -1, ph, pw, c) + 1.0) / 2.0
  if kind == 'mean_color':
    return color_classes(jnp.mean(x01, axis=(2, 3)), bits)
  if kind == 'downsized':
    s = downsize
    cells = x01.reshape(*x01.shape[:2], s, ph // s, s, pw // s, c).mean(axis=(3, 5))
    return color_classes(cells.reshape(*x01.shape[:2], s * s, c), bits)
  raise ValueError(f'mpp.target {kind!r} is not one of {TARGETS}')


class MppHead(nn.Module):
  """The prediction head on output tokens [B, N, D] -> [B, N, outputs] (a linear layer)."""
  outputs: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.outputs, name='Dense_0')(x.astype(jnp.float32))


class MaskedPatchPrediction(Objective):
  """The ViT paper's masked patch prediction (see the module docstring)."""
  name = 'mpp'
  config_key = 'mpp'
  needs = (tokens_lib.TOKEN_MASK, tokens_lib.TOKEN_MAP)
  uses_labels = False
  best_metric, best_mode = 'eval_loss', 'min'
  metrics = ('corrupted', 'accuracy')
  summary = ('masked patch prediction (the ViT paper): predict corrupted patches\' 3-bit mean '
             'colour, 4x4 colours or pixels')

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {'target': 'mean_color', 'corrupt': 0.5, 'mask': 0.8, 'random': 0.1, 'bits': 3,
            'downsize': 4}

  @classmethod
  def check_config(cls, config, family) -> None:
    super().check_config(config, family)
    block = {**cls.defaults(), **dict(config.get('mpp') or {})}
    if block['target'] not in TARGETS:
      raise ValueError(f'mpp.target {block["target"]!r}: one of {TARGETS}')
    for key in ('corrupt', 'mask', 'random'):
      v = block[key]
      if not (isinstance(v, (int, float)) and 0 <= v <= 1):
        raise ValueError(f'mpp.{key} must be a fraction in [0, 1], got {v!r}')
    if block['corrupt'] == 0:
      raise ValueError('mpp.corrupt is 0: no patch would be predicted')
    if block['mask'] + block['random'] > 1:
      raise ValueError(f'mpp.mask + mpp.random = {block["mask"] + block["random"]} exceeds 1 (the '
                       'rest of the corrupted patches are kept as they are)')
    for key in ('bits', 'downsize'):
      if not (isinstance(block[key], int) and block[key] > 0):
        raise ValueError(f'mpp.{key} must be a positive integer, got {block[key]!r}')
    if block['target'] == 'downsized' and family is not None:
      from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
      _, fields = registry.resolve(config['model'])
      _, _, (ph, pw) = patch_layout(family, fields, config)
      if ph % block['downsize'] or pw % block['downsize']:
        raise ValueError(f"mpp.target='downsized' averages each {ph}x{pw} patch into "
                         f"{block['downsize']}x{block['downsize']} cells: the patch size must be a "
                         'multiple of mpp.downsize')

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self.cfg = {**self.defaults(), **dict(self.block())}
    _, self.grid, self.patch_hw = patch_layout(self.family, self.fields, config)
    self.num_patches = self.grid[0] * self.grid[1]

  def head_classes(self) -> Optional[int]:
    return None  # the encoder alone: its tokens go to the objective's head

  def _outputs(self, channels: int) -> int:
    classes = (2 ** self.cfg['bits']) ** channels
    kind = self.cfg['target']
    if kind == 'mean_color':
      return classes
    if kind == 'downsized':
      return self.cfg['downsize'] ** 2 * classes
    return self.patch_hw[0] * self.patch_hw[1] * channels

  def init_own(self, model, rng, input_shape) -> dict[str, Any]:
    d = token_width(model, input_shape)
    k_mask, k_head = jax.random.split(rng)
    head = MppHead(self._outputs(input_shape[-1])).init(k_head, jnp.zeros((1, 1, d)))['params']
    # As a patch embedding's scale at initialisation (timm and BEiT: trunc normal 0.02).
    return {'mask_embedding': 0.02 * jax.random.normal(k_mask, (d,), jnp.float32), 'head': head}

  def _forward(self, model, params, extras, images, rng, *, train: bool):
    """(per-patch losses [B, N], hits [B, N] or None, corrupted [B, N]) on images [B, H, W, C]."""
    own = own_params(params)
    k_corrupt, k_drop = jax.random.split(rng)
    b = images.shape[0]
    draw = corrupt(k_corrupt, (b, self.num_patches), self.cfg['corrupt'], self.cfg['mask'],
                   self.cfg['random'])
    tokens = tokens_lib.TokenInputs(source=draw['source'], mask=draw['mask'],
                                    mask_embedding=own['mask_embedding'])
    rngs = {'dropout': k_drop} if train else {}
    _, aux = model.apply({'params': model_params(params, extras)}, images, train=train, rngs=rngs,
                         tokens=tokens, return_aux=True, return_weights=False)
    pred = MppHead(self._outputs(images.shape[-1])).apply({'params': own['head']},
                                                          aux['patch_tokens'])
    kind = self.cfg['target']
    target = targets(images, self.patch_hw, kind, self.cfg['bits'], self.cfg['downsize'])
    if kind == 'pixels':
      per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
      hits = None
    else:
      if kind == 'downsized':
        pred = pred.reshape(*pred.shape[:2], target.shape[-1], -1)
      nll = optax.softmax_cross_entropy_with_integer_labels(pred, target)
      right = (jnp.argmax(pred, axis=-1) == target).astype(jnp.float32)
      per_patch = nll if kind == 'mean_color' else jnp.mean(nll, axis=-1)
      hits = right if kind == 'mean_color' else jnp.mean(right, axis=-1)
    return per_patch, hits, draw['corrupted'].astype(jnp.float32)

  def loss(self, model, params, extras, batch: Batch, rng):
    per_patch, hits, corrupted = self._forward(model, params, extras, batch['image'], rng,
                                               train=True)
    n = jnp.maximum(jnp.sum(corrupted), 1.0)
    loss = jnp.sum(per_patch * corrupted) / n
    accuracy = jnp.sum(hits * corrupted) / n if hits is not None else jnp.zeros((), jnp.float32)
    return loss, {'corrupted': jnp.mean(corrupted), 'accuracy': accuracy}

  def eval_sums(self, model, params, extras, batch: Batch, rng):
    per_patch, hits, corrupted = self._forward(model, params, extras, batch['image'], rng,
                                               train=False)
    weight = corrupted * batch['mask'].astype(jnp.float32)[:, None]
    sums = {'loss': jnp.sum(per_patch * weight), 'patches': jnp.sum(weight),
            'count': jnp.sum(batch['mask'].astype(jnp.float32))}
    if hits is not None:
      sums['hits'] = jnp.sum(hits * weight)
    return sums

  def eval_summary(self, totals) -> dict[str, float]:
    patches = max(float(totals['patches']), 1.0)
    out = {'eval_loss': float(totals['loss']) / patches, 'eval_count': int(totals['count'])}
    if 'hits' in totals:
      out['eval_accuracy'] = float(totals['hits']) / patches
    return out

  def visualize(self, model, params, images, rng):
    """The input, what the encoder saw (masked patches grey, replaced ones from their source), each
    patch's true 3-bit mean colour, and the predicted one on the corrupted patches (the centre of
    the most likely class; the others as they are, dimmed)."""
    if self.cfg['target'] != 'mean_color':
      return None
    own = own_params(params)
    b, c = images.shape[0], images.shape[-1]
    draw = corrupt(rng, (b, self.num_patches), self.cfg['corrupt'], self.cfg['mask'],
                   self.cfg['random'])
    tokens = tokens_lib.TokenInputs(source=draw['source'], mask=draw['mask'],
                                    mask_embedding=own['mask_embedding'])
    _, aux = model.apply({'params': model_params(params, {})}, images, tokens=tokens,
                         return_aux=True, return_weights=False)
    logits = MppHead(self._outputs(c)).apply({'params': own['head']}, aux['patch_tokens'])
    levels = 2 ** self.cfg['bits']
    cls = np.asarray(jnp.argmax(logits, axis=-1))
    digits = np.stack([(cls // levels ** (c - 1 - i)) % levels for i in range(c)], axis=-1)
    predicted = (digits + 0.5) / levels                                      # [B, N, C]
    x01 = to_unit(images)
    patches = np.asarray(patchify(jnp.asarray(x01), self.patch_hw)).reshape(b, self.num_patches,
                                                                               -1, c)
    true = np.asarray(color_classes(jnp.asarray(patches.mean(axis=2)), self.cfg['bits']))
    true = np.stack([(true // levels ** (c - 1 - i)) % levels for i in range(c)], -1)
    true = (true + 0.5) / levels
    corrupted = np.asarray(draw['corrupted'])[..., None]
    source = np.asarray(draw['source'])
    seen = np.take_along_axis(patches, source[..., None, None], axis=1)
    seen = np.where(np.asarray(draw['mask'])[..., None, None], 0.5, seen)
    pixels = self.patch_hw[0] * self.patch_hw[1]
    flat = lambda colours: np.repeat(colours[:, :, None], pixels, axis=2).reshape(
        b, self.num_patches, -1)
    # Corrupted patches: their predicted colour; the others: the input, dimmed.
    shown = np.where(corrupted[..., None], flat(predicted).reshape(patches.shape),
                     0.25 + 0.5 * patches)
    back = lambda p: unpatchify(p.reshape(b, self.num_patches, -1), self.grid, self.patch_hw, c)
    return {'title': 'Masked patch prediction',
            'caption': ('input; what the encoder saw (grey: the [mask] embedding; moved patches: '
                        'another patch\'s embedding); every patch\'s true 3-bit mean colour; the '
                        'predicted colour of each corrupted patch (the others: the input, dimmed)'),
            'columns': [('input', x01), ('encoder input', back(seen)),
                        ('true mean colour', back(flat(true))),
                        ('predicted (corrupted patches)', back(shown))]}


OBJECTIVE = MaskedPatchPrediction
