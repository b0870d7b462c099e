"""One train step and one eval step, jitted with explicit shardings. Read top to bottom.

train_step(state, batch) -> (state, metrics):
  1. per-step dropout key = fold_in(state.rng, state.step)
  2. gradients of the mean loss over the global batch; with `accum_steps` = k the batch is split into
     k micro-batches (each device splits its own rows, so nothing moves between devices) whose
     gradients are averaged: the same mathematics as one big batch
  3. the optimizer update (clipping, Adam or SGD, schedule), then the optional parameter EMA; with
     `skip_nonfinite`, a step whose loss or gradient norm is NaN/inf keeps the old parameters,
     optimizer state and EMA (only the step counter moves on)
  4. metrics: loss, global gradient norm (before clipping), learning rate (+ `skipped`: 1.0 when
     the update was skipped, with `skip_nonfinite`)

Distillation (DeiT, `Distillation`): a frozen teacher runs in inference mode inside the same jitted
step on the same augmented batch; its parameters are a separate argument (never in the TrainState,
so never updated or checkpointed). The student's class head learns the labels and its distillation
head the teacher: loss = (1 - alpha) CE(cls, labels) + alpha distill(dist, teacher); metrics add
`cls_loss` and `distill_loss`.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from vit_jax import sharding as sharding_lib
from vit_jax.train import optim
from vit_jax.train.state import TrainState

LOSSES = ('softmax_xent', 'sigmoid_xent')
DISTILL_KINDS = ('hard', 'soft')


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


# ---------- distillation (DeiT) ----------

def distill_loss(student: jax.Array, teacher: jax.Array, kind: str = 'hard',
                 temperature: float = 3.0) -> jax.Array:
  """Mean over the batch of DeiT's distillation losses; student, teacher: logits [B, K].

  hard: softmax cross-entropy of the student against the teacher's argmax class.
  soft: T^2 KL(softmax(teacher / T) || softmax(student / T)), the paper's definition (Hinton's
    scaling; DeiT's code divides the summed KL by B*K instead of B, i.e. by K more).
  """
  student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if kind == 'hard':
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        student, jnp.argmax(teacher, axis=-1)))
  if kind == 'soft':
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature ** 2
  raise ValueError(f'distill.kind {kind!r} is not one of {DISTILL_KINDS}')


def has_distillation_head(model_class: type) -> bool:
  """Whether a module class returns its two heads separately (`return_both`): the DeiT family."""
  return 'return_both' in inspect.signature(model_class.__call__).parameters


def teacher_input_fn(student_size: tuple[int, int], student_channels: int,
                     teacher_size: tuple[int, int], teacher_channels: int,
                     mean: Any, std: Any) -> Callable[[jax.Array], jax.Array]:
  """images [B, H, W, C] in [-1, 1] (the student's batch) -> the teacher's input [B, h, w, c]:
  resized (bilinear, antialiased) to its image size, grey repeated to 3 channels, and normalised
  as the teacher was trained ((x01 - mean) / std). Other channel changes are a ValueError."""
  if teacher_channels != student_channels and not (student_channels == 1 and teacher_channels == 3):
    raise ValueError(f'the teacher takes {teacher_channels}-channel images, the student '
                     f'{student_channels}: only grey to RGB (1 -> 3) is converted; train the '
                     f'student with --config.channels={teacher_channels} or use another teacher')
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # This project trains on [-1, 1] (mean = std = 0.5); other teachers (timm's ImageNet) differ.
  renormalise = not (np.all(mean == 0.5) and np.all(std == 0.5))

  def fn(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    if tuple(student_size) != tuple(teacher_size):
      x = jax.image.resize(x, (x.shape[0], *teacher_size, x.shape[-1]), 'bilinear')
    if teacher_channels != student_channels:
      x = jnp.repeat(x, teacher_channels, axis=-1)
    if renormalise:
      x = ((x + 1.0) / 2.0 - mean) / std
    return x
  return fn


@dataclasses.dataclass(frozen=True)
class Distillation:
  """A frozen teacher for a DeiT student.

  model: the teacher's Flax module (any family; run with train=False). params: its parameters,
  already placed on the mesh; shardings: theirs. input_fn: student batch -> teacher input
  (`teacher_input_fn`). kind, alpha, temperature: `config.distill`.
  """
  model: Any
  params: Any
  shardings: Any
  input_fn: Callable[[jax.Array], jax.Array]
  kind: str = 'hard'
  alpha: float = 0.5
  temperature: float = 3.0


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable, mesh: Mesh,
                    shardings: TrainState, *, loss: str = 'softmax_xent',
                    label_smoothing: float = 0.0, accum_steps: int = 1,
                    ema_decay: Optional[float] = None,
                    distill: Optional[Distillation] = None,
                    skip_nonfinite: bool = False) -> Callable:
  """The jitted train step, called as step(state, batch); the state argument is donated (updated in
  place). With `distill`, the teacher's parameters go to the jitted function as a third argument."""
  batch_sharding = sharding_lib.batch_sharding(mesh)
  if distill is not None and not has_distillation_head(type(model)):
    raise ValueError(f'distillation needs a student with a distillation head (a DeiT model); '
                     f'{type(model).__name__} has one head')

  def grads_of(params, images, labels, rng, teacher_params=None):
    targets = smooth_labels(labels, label_smoothing)
    if distill is None:
      def objective(p):
        logits = model.apply({'params': p}, images, train=True, rngs={'dropout': rng})
        return loss_fn(logits, targets, loss), {}
    else:
      teacher = distill.model.apply({'params': teacher_params}, distill.input_fn(images),
                                    train=False)
      teacher = jax.lax.stop_gradient(teacher)
      def objective(p):
        cls, dist = model.apply({'params': p}, images, train=True, rngs={'dropout': rng},
                                return_both=True)
        base = loss_fn(cls, targets, loss)
        kd = distill_loss(dist, teacher, distill.kind, distill.temperature)
        total = (1.0 - distill.alpha) * base + distill.alpha * kd
        return total, {'cls_loss': base, 'distill_loss': kd}
    (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return (value, aux), grads

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images = jax.lax.with_sharding_constraint(batch['image'], batch_sharding)
    labels = jax.lax.with_sharding_constraint(batch['labels'], batch_sharding)

    if accum_steps == 1:
      (loss_value, aux), grads = grads_of(state.params, images, labels, rng, teacher_params)
    else:
      def micro(x):  # [B, ...] -> [k, B/k, ...], row i*k + j goes to micro-batch j
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return x
      def body(carry, xs):
        j, imgs, labs = xs
        imgs = jax.lax.with_sharding_constraint(imgs, batch_sharding)
        labs = jax.lax.with_sharding_constraint(labs, batch_sharding)
        (l, a), g = grads_of(state.params, imgs, labs, jax.random.fold_in(rng, j),
                             teacher_params)
        return jax.tree.map(jnp.add, carry, (l, a, g)), None
      scalar = jnp.zeros((), jnp.float32)
      aux0 = {} if distill is None else {'cls_loss': scalar, 'distill_loss': scalar}
      zeros = (scalar, aux0, jax.tree.map(jnp.zeros_like, state.params))
      (loss_value, aux, grads), _ = jax.lax.scan(
          body, zeros, (jnp.arange(accum_steps), micro(images), micro(labels)))
      loss_value, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss_value, aux, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay is not None:
      ema = optim.ema_update(ema, params, ema_decay)
    grad_norm = optax.global_norm(grads)
    metrics = {'loss': loss_value, 'grad_norm': grad_norm, 'lr': schedule(state.step), **aux}
    if skip_nonfinite:
      # One NaN/inf anywhere makes the global norm non-finite. Selecting inside the step keeps the
      # state on device and costs one select per element; the data and step counter move on.
      finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss_value)
      params, opt_state, ema = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), (params, opt_state, ema),
          (state.params, state.opt_state, state.ema_params))
      metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  batch_shardings = {'image': batch_sharding, 'labels': batch_sharding}
  out_shardings = (shardings, sharding_lib.replicated(mesh))
  if distill is None:
    return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                   out_shardings=out_shardings, donate_argnums=(0,))
  jitted = jax.jit(train_step, in_shardings=(shardings, batch_shardings, distill.shardings),
                   out_shardings=out_shardings, donate_argnums=(0,))

  def with_teacher(state, batch):
    return jitted(state, batch, distill.params)
  # step.lower(state, batch), as for a plain jitted step (plans compile it ahead of time).
  with_teacher.lower = lambda state, batch: jitted.lower(state, batch, distill.params)
  return with_teacher


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
