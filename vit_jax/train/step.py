"""One train step and one eval step, jitted with explicit shardings. Read top to bottom.

train_step(state, batch) -> (state, metrics):
  1. per-step dropout key = fold_in(state.rng, state.step)
  2. gradients of the mean loss over the global batch; with `accum_steps` = k the batch is split into
     k micro-batches (each device splits its own rows, so nothing moves between devices) whose
     gradients are averaged: the same mathematics as one big batch
  3. the optimizer update (clipping, Adam or SGD, schedule), then the optional parameter EMA
  4. metrics: loss, global gradient norm (before clipping), learning rate
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from vit_jax import sharding as sharding_lib
from vit_jax.train import optim
from vit_jax.train.state import TrainState

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


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable, mesh: Mesh,
                    shardings: TrainState, *, loss: str = 'softmax_xent',
                    label_smoothing: float = 0.0, accum_steps: int = 1,
                    ema_decay: Optional[float] = None) -> Callable:
  """The jitted train step; the state argument is donated (updated in place)."""
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def grads_of(params, images, labels, rng):
    def objective(p):
      logits = model.apply({'params': p}, images, train=True, rngs={'dropout': rng})
      return loss_fn(logits, smooth_labels(labels, label_smoothing), loss)
    return jax.value_and_grad(objective)(params)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images = jax.lax.with_sharding_constraint(batch['image'], batch_sharding)
    labels = jax.lax.with_sharding_constraint(batch['labels'], batch_sharding)

    if accum_steps == 1:
      loss_value, grads = grads_of(state.params, images, labels, rng)
    else:
      def micro(x):  # [B, ...] -> [k, B/k, ...], row i*k + j goes to micro-batch j
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return x
      def body(carry, xs):
        j, imgs, labs = xs
        imgs = jax.lax.with_sharding_constraint(imgs, batch_sharding)
        labs = jax.lax.with_sharding_constraint(labs, batch_sharding)
        l, g = grads_of(state.params, imgs, labs, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, (l, g)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss_value, grads), _ = jax.lax.scan(
          body, zeros, (jnp.arange(accum_steps), micro(images), micro(labels)))
      loss_value, grads = jax.tree.map(lambda x: x / accum_steps, (loss_value, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay is not None:
      ema = optim.ema_update(ema, params, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    metrics = {'loss': loss_value, 'grad_norm': optax.global_norm(grads),
               'lr': schedule(state.step)}
    return new_state, metrics

  batch_shardings = {'image': batch_sharding, 'labels': batch_sharding}
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model, mesh: Mesh, params_shardings: Any) -> Callable:
  """eval_step(params, batch) -> sums over the unmasked examples of the batch:
  {'loss': summed softmax cross-entropy, 'top1': correct, 'top5': correct in top 5, 'count'}."""
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False).astype(jnp.float32)
    labels = batch['label']
    mask = batch['mask'].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {'loss': jnp.sum(nll * mask), 'top1': jnp.sum(top1 * mask),
            'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}

  batch_shardings = {'image': batch_sharding, 'label': batch_sharding, 'mask': batch_sharding}
  return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings),
                 out_shardings=sharding_lib.replicated(mesh))
