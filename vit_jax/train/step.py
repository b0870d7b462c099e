"""One train step and one eval step, jitted with explicit shardings. Read top to bottom.

train_step(state, batch) -> (state, metrics):
  1. per-step dropout key = fold_in(state.rng, state.step)
  2. gradients of the objective's mean loss over the global batch; with `accum_steps` = k the
     batch is split into k micro-batches (each device splits its own rows, so nothing moves between
     devices) whose gradients are averaged: the same mathematics as one big batch
  3. the optimizer update (clipping, Adam or SGD, schedule), then the optional parameter EMA; with
     `skip_nonfinite`, a step whose loss or gradient norm is NaN/inf keeps the old parameters,
     optimizer state and EMA (only the step counter moves on)
  4. metrics: loss, global gradient norm (before clipping), learning rate, the objective's own
     (+ `skipped`: 1.0 when the update was skipped, with `skip_nonfinite`)

The objective (`vit_jax.objectives`) supplies the loss and the evaluation sums; this module names
none. Its frozen extras (frozen models or parameters) are the jitted function's third argument,
never updated or checkpointed; `TrainStep` binds them, so a step is called as step(state, batch)
and lowered as step.lower(state, batch) whatever the objective.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from vit_jax import sharding as sharding_lib
from vit_jax.objectives import registry as objectives
from vit_jax.objectives.base import Objective
from vit_jax.train import optim
from vit_jax.train.state import TrainState


class TrainStep:
  """A jitted step(state, batch, extras) with the objective's extras bound: call it as
  step(state, batch); `lower(state, batch)` lowers it (plans compile it ahead of time)."""

  def __init__(self, jitted: Callable, extras: Any):
    self.jitted, self.extras = jitted, extras

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.extras)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.extras)

  def bind(self, extras: Any) -> 'TrainStep':
    """The same compiled step with other extras (the live ones, after a plan's abstract ones)."""
    return type(self)(self.jitted, extras)


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable, mesh: Mesh,
                    shardings: TrainState, *, objective: Optional[Objective] = None,
                    extras: Any = None, extras_shardings: Any = None, accum_steps: int = 1,
                    ema_decay: Optional[float] = None, skip_nonfinite: bool = False) -> TrainStep:
  """The jitted train step of `objective` for `model`, called as step(state, batch); the state
  argument is donated (updated in place).

  objective: how the model learns (`vit_jax.objectives`); None: the registry's default objective
  with its default settings.
  extras, extras_shardings: the objective's frozen extras and their shardings (default: what
  `objective.make_extras` gives on `mesh`).
  """
  if objective is None:
    objective = objectives.get(objectives.DEFAULT)({})
  if extras is None:
    extras, extras_shardings = objective.make_extras(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def grads_of(params, extras, batch, rng):
    def objective_fn(p):
      return objective.loss(model, p, extras, batch, rng)
    return jax.value_and_grad(objective_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch: dict[str, jax.Array], extras: Any):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = {k: jax.lax.with_sharding_constraint(v, batch_sharding) for k, v in batch.items()}

    if accum_steps == 1:
      (loss_value, aux), grads = grads_of(state.params, extras, batch, rng)
    else:
      def micro(x):  # [B, ...] -> [k, B/k, ...], row i*k + j goes to micro-batch j
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
      def body(carry, xs):
        j, part = xs
        part = {k: jax.lax.with_sharding_constraint(v, batch_sharding) for k, v in part.items()}
        (l, a), g = grads_of(state.params, extras, part, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None
      parts = {k: micro(v) for k, v in batch.items()}
      scalar = jnp.zeros((), jnp.float32)
      zeros = (scalar, {k: scalar for k in objective.metrics},
               jax.tree.map(jnp.zeros_like, state.params))
      (loss_value, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), parts))
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

  # Every batch entry is split over the batch axes (the objective decides which entries exist).
  jitted = jax.jit(train_step, in_shardings=(shardings, batch_sharding, extras_shardings),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  return TrainStep(jitted, extras)


class EvalStep:
  """A jitted eval_step(params, batch, extras, index) with the extras bound: call it as
  eval_step(params, batch) or eval_step(params, batch, index) (the batch's position in the split,
  which seeds an objective's random masking of that batch)."""

  def __init__(self, jitted: Callable, extras: Any):
    self.jitted, self.extras = jitted, extras

  def __call__(self, params, batch, index: int = 0):
    return self.jitted(params, batch, self.extras, jnp.asarray(index, jnp.int32))

  def bind(self, extras: Any) -> 'EvalStep':
    return type(self)(self.jitted, extras)


def make_eval_step(model, mesh: Mesh, params_shardings: Any, *,
                   objective: Optional[Objective] = None, extras: Any = None,
                   extras_shardings: Any = None, seed: int = 0) -> EvalStep:
  """eval_step(params, batch) -> the objective's sums over the unmasked examples of the batch
  (classification: {'loss': summed softmax cross-entropy, 'top1': correct, 'top5': correct in top
  5, 'count'}). Random draws of the evaluation (masks) come from `seed` and the batch index, so
  every evaluation of a run sees the same ones."""
  if objective is None:
    objective = objectives.get(objectives.DEFAULT)({})
  if extras is None:
    extras, extras_shardings = {}, {}
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def eval_step(params, batch, extras, index):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    return objective.eval_sums(model, params, extras, batch, rng)

  jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding, extras_shardings,
                                            sharding_lib.replicated(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
  return EvalStep(jitted, extras)
