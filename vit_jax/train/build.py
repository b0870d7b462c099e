"""Everything a training run compiles, built from its config: mesh, model, objective, schedule,
optimizer, the abstract state and its shardings, the objective's frozen extras and the jitted train
and eval steps.

`vit_jax.train.loop.train_and_evaluate` and `vit_jax.plan` both call `build_training`, so a plan
lowers and compiles the very function training runs. Nothing here allocates the student's
parameters: the state is described by `jax.ShapeDtypeStruct`s carrying their shardings
(`Training.abstract_state`); training then creates or restores the live state in that layout.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import runtime
from vit_jax import sharding as sharding_lib
from vit_jax.families import registry
from vit_jax.families.base import Family
from vit_jax.shapes import hw
from vit_jax import objectives as objectives_lib
from vit_jax.objectives.base import Objective
from vit_jax.train import optim
from vit_jax.train import state as state_lib
from vit_jax.train import step as step_lib


def compute_dtype(name: str, platform: Optional[str] = None):
  """'auto' -> bfloat16 on GPU/TPU, float32 on CPU (where bf16 matmuls are emulated and slow).

  platform: the devices' platform ('cpu', 'gpu', 'tpu'); default: JAX's default backend. A plan for
  a TPU topology compiled on a CPU machine passes 'tpu'.
  """
  if name == 'auto':
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, num_classes: Optional[int],
                platform: Optional[str] = None) -> tuple[Family, Any, dict]:
  """(family, module, fields) of `config.model` (registry name plus overrides) for `num_classes`
  (None: no classifier head)."""
  family, fields = registry.resolve(config.model)
  model = family.create(fields, num_classes, dtype=compute_dtype(config.dtype, platform))
  return family, model, fields


def check_batch_sizes(config, mesh) -> None:
  """Batches must split evenly over processes and the mesh's batch axes; say so before training.

  The processes are those owning the mesh's devices (`jax.process_count()` in a run; the hosts of
  the topology in a plan)."""
  shards = math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)
  shards = math.lcm(shards, len({d.process_index for d in mesh.devices.flat}))
  micro = config.batch_size // config.accum_steps
  if config.batch_size % config.accum_steps or micro % shards:
    raise ValueError(f'batch_size {config.batch_size} / accum_steps {config.accum_steps} = {micro} '
                     f'must be a multiple of {shards} (devices on the data/fsdp axes and '
                     f'processes); change --config.batch_size')
  eval_bs = config.eval_batch_size or config.batch_size
  if eval_bs % shards:
    raise ValueError(f'eval_batch_size {eval_bs} must be a multiple of {shards} (devices on the '
                     f'data/fsdp axes and processes); change --config.eval_batch_size')


@dataclasses.dataclass
class Training:
  """What `build_training` returns. objective: how the model learns (`vit_jax.objectives`);
  abstract_state: the TrainState as ShapeDtypeStructs with their shardings (the target of a
  restore, the input of a plan); shardings: the same tree of NamedShardings; extras: the
  objective's frozen extras (a teacher), live or, `abstract`, shapes with shardings (frozen model
  parameters are added by `with_frozen`); input_shape: [1, H, W, C] of one image;
  train_step(state, batch) and eval_step(params, batch): the jitted steps, extras bound."""
  config: ml_collections.ConfigDict
  mesh: Any
  family: Family
  model: Any
  fields: dict[str, Any]
  num_classes: Optional[int]
  objective: Objective
  schedule: Callable
  tx: Any
  use_ema: bool
  input_shape: tuple[int, ...]
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  extras: dict[str, Any]
  extras_shardings: dict[str, Any]
  train_step: step_lib.TrainStep
  eval_step: step_lib.EvalStep

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch as the loader yields it (the objective's batch spec: e.g.
    {'image': f32 [B, H, W, C], 'labels': f32 [B, K]}), sharded over the batch axes."""
    sharding = sharding_lib.batch_sharding(self.mesh)
    b = self.config.batch_size
    return {k: jax.ShapeDtypeStruct((b, *spec.shape), spec.dtype, sharding=sharding)
            for k, spec in self.objective.batch_spec(self.input_shape[1:]).items()}

  def lower(self):
    """The train step lowered for the abstract state and batch (nothing allocated)."""
    return self.train_step.lower(self.abstract_state, self.abstract_batch())

  def frozen_shardings(self, frozen: Any) -> Any:
    return sharding_lib.tree_shardings(frozen, self.mesh, self.config.fsdp_min_size,
                                       self.family.tensor_rules)

  def with_frozen(self, frozen: Any) -> 'Training':
    """This training with the objective's frozen model parameters (a tree in the module layout:
    host arrays, placed here, or ShapeDtypeStructs) added to the extras, and steps rebound."""
    if not frozen:
      return self
    shardings = self.frozen_shardings(frozen)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
      placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            frozen, shardings)
    else:
      placed = jax.device_put(frozen, shardings)
    extras = {**self.extras, 'frozen': placed}
    extras_shardings = {**self.extras_shardings, 'frozen': shardings}
    train_step, eval_step = _steps(self.config, self.model, self.objective, self.tx,
                                   self.schedule, self.mesh, self.shardings, extras,
                                   extras_shardings, self.use_ema)
    return dataclasses.replace(self, extras=extras, extras_shardings=extras_shardings,
                               train_step=train_step, eval_step=eval_step)


def _steps(config, model, objective, tx, schedule, mesh, shardings, extras, extras_shardings,
           use_ema):
  train_step = step_lib.make_train_step(
      model, tx, schedule, mesh, shardings, objective=objective, extras=extras,
      extras_shardings=extras_shardings, accum_steps=config.accum_steps,
      ema_decay=config.ema_decay if use_ema else None,
      skip_nonfinite=bool(config.get('skip_nonfinite', False)))
  eval_step = step_lib.make_eval_step(model, mesh, shardings.params, objective=objective,
                                      extras=extras, extras_shardings=extras_shardings,
                                      seed=config.seed)
  return train_step, eval_step


def build_training(config: ml_collections.ConfigDict, num_classes: Optional[int], *,
                   devices: Optional[Sequence[Any]] = None, abstract: bool = False,
                   teacher_model: Optional[str] = None,
                   objective: Optional[Objective] = None) -> Training:
  """Mesh, model, objective, schedule, optimizer, abstract state and shardings, extras and jitted
  steps of `config` for a dataset of `num_classes` (None or 0: unlabelled).

  devices: the mesh's devices (default: all of `jax.devices()`); a plan passes a topology's
  (compile-only TPU devices, or fake CPU ones), and `config.dtype='auto'` follows their platform.
  abstract: the extras (a teacher, frozen parameters) as shapes only; teacher_model: a registered
  architecture to plan distillation with when there is no teacher checkpoint; objective: the
  objective already made (e.g. with a teacher in memory) instead of the config's.
  Frozen model parameters (an objective that freezes a pretrained backbone) are not loaded here:
  `with_frozen` adds them (`abstract`: their shapes are added here).
  """
  devices = list(jax.devices() if devices is None else devices)
  platform = devices[0].platform
  if not abstract:
    runtime.tune_for_backend(platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  family, fields = registry.resolve(config.model)
  if objective is None:
    objective = objectives_lib.create(config, family, fields, num_classes or None,
                                      teacher_model=teacher_model)
  family, model, fields = build_model(config, objective.head_classes(), platform)
  schedule = optim.make_schedule(config.base_lr, config.total_steps, config.warmup_steps,
                                 config.lr_decay, config.end_lr)
  tx = optim.make_optimizer(config, schedule)
  use_ema = bool(config.ema_decay)
  input_shape = (1, *hw(config.image_size), config.channels)
  check_batch_sizes(config, mesh)
  abstract_state, shardings = state_lib.abstract_state(
      model, tx, input_shape, config.seed, mesh, use_ema=use_ema,
      fsdp_min_size=config.fsdp_min_size,
      tensor_rules=tuple(family.tensor_rules) + tuple(objective.tensor_rules), objective=objective)
  extras, extras_shardings = objective.make_extras(mesh, platform=platform, abstract=abstract)
  train_step, eval_step = _steps(config, model, objective, tx, schedule, mesh, shardings, extras,
                                 extras_shardings, use_ema)
  built = Training(config, mesh, family, model, fields, num_classes or None, objective, schedule,
                   tx, use_ema, input_shape, abstract_state, shardings, extras, extras_shardings,
                   train_step, eval_step)
  if abstract and objective.freezes():
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros(input_shape))['params'])
    built = built.with_frozen(objective.frozen_params(tree))
  return built
