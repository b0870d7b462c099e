"""Supervised classification: images in, logits against (soft) labels out. The default objective.

    loss = mean_b CE(logits_b, (1 - s) y_b + s / K)        softmax_xent (the paper's), or
    loss = mean_b sum_k BCE(logits_bk, y_bk)                sigmoid_xent (big_vision's)

Its keys are the config's top-level `loss` and `label_smoothing` (where every recipe has always set
them). Evaluation: summed cross-entropy, top-1 and top-5 over the unmasked examples; the best
checkpoint is the one with the highest `eval_top1`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vit_jax.objectives.base import Batch, Objective, model_params

LOSSES = ('softmax_xent', 'sigmoid_xent')


def smooth_labels(labels: jax.Array, smoothing: float) -> jax.Array:
  """[B, K] targets mixed with the uniform distribution: (1 - s) * y + s / K."""
  if not smoothing:
    return labels
  return labels * (1.0 - smoothing) + smoothing / labels.shape[-1]


def loss_fn(logits: jax.Array, labels: jax.Array, kind: str = 'softmax_xent') -> jax.Array:
  """Mean loss over the batch. logits, labels: [B, K]; labels are (soft) targets in [0, 1]."""
  logits = logits.astype(jnp.float32)
  if kind == 'softmax_xent':
    return jnp.mean(optax.softmax_cross_entropy(logits, labels))
  if kind == 'sigmoid_xent':  # summed over classes, as big_vision
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1))
  raise ValueError(f'loss {kind!r} is not one of {LOSSES}')


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array
                        ) -> dict[str, jax.Array]:
  """Sums over the unmasked rows: softmax cross-entropy, top-1 and top-5 hits, count.
  logits [B, K]; labels int [B]; mask bool [B]."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  top1 = (topk[:, 0] == labels).astype(jnp.float32)
  top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
  return {'loss': jnp.sum(nll * mask), 'top1': jnp.sum(top1 * mask),
          'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}


class Classify(Objective):
  """Labels in, logits out: the paper's pre-training and fine-tuning objective."""
  name = 'classify'
  summary = 'supervised classification (softmax or sigmoid cross-entropy, label smoothing)'

  @classmethod
  def check_config(cls, config, family) -> None:
    super().check_config(config, family)
    if config.get('loss', 'softmax_xent') not in LOSSES:
      raise ValueError(f'loss {config.get("loss")!r}: one of {LOSSES}')
    smoothing = config.get('label_smoothing', 0.0)
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
      raise ValueError('label_smoothing must be in [0, 1)')

  @property
  def loss_kind(self) -> str:
    return self.config.get('loss', 'softmax_xent')

  @property
  def smoothing(self) -> float:
    return float(self.config.get('label_smoothing', 0.0))

  def logits(self, model: Any, params: Mapping[str, Any], extras: Mapping[str, Any],
             images: jax.Array, *, train: bool, rng: Any = None) -> jax.Array:
    """The model's logits [B, K] (subclasses add token inputs)."""
    rngs = {'dropout': rng} if train else {}
    return model.apply({'params': model_params(params, extras)}, images, train=train, rngs=rngs)

  def loss(self, model, params, extras, batch: Batch, rng):
    logits = self.logits(model, params, extras, batch['image'], train=True, rng=rng)
    return loss_fn(logits, smooth_labels(batch['labels'], self.smoothing), self.loss_kind), {}

  def meta(self) -> dict[str, Any]:
    return {'name': self.name, 'config': {'loss': self.loss_kind, 'label_smoothing': self.smoothing}}

  def eval_sums(self, model, params, extras, batch: Batch, rng):
    del rng
    logits = self.logits(model, params, extras, batch['image'], train=False)
    return classification_sums(logits, batch['label'], batch['mask'])

OBJECTIVE = Classify
