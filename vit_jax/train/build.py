"""Everything a training run compiles, built from its config: mesh, model, schedule, optimizer, the
abstract state and its shardings, the distillation teacher and the jitted train and eval steps.

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
from vit_jax.families.base import Architecture, Family, hw
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


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                platform: Optional[str] = None) -> tuple[Family, Any, dict]:
  """(family, module, fields) of `config.model` (registry name plus overrides) for `num_classes`."""
  family, fields = registry.resolve(config.model)
  model = family.create(fields, num_classes, dtype=compute_dtype(config.dtype, platform))
  return family, model, fields


def _distillation(config, arch: Architecture, tree: Any, mesh, platform: Optional[str],
                  abstract: bool) -> step_lib.Distillation:
  """A frozen teacher of architecture `arch` with parameters `tree` (module layout): placed on the
  mesh with its family's rules, or, `abstract`, described by ShapeDtypeStructs with shardings."""
  family = arch.get_family()
  model = arch.create_model(dtype=compute_dtype(config.dtype, platform))
  shardings = sharding_lib.tree_shardings(tree, mesh, config.fsdp_min_size, family.tensor_rules)
  if abstract:
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          tree, shardings)
  else:
    params = jax.device_put(tree, shardings)
  input_fn = step_lib.teacher_input_fn(hw(config.image_size), config.channels, arch.image_size,
                                       arch.channels, arch.mean, arch.std)
  return step_lib.Distillation(model, params, shardings, input_fn, config.distill.kind,
                               float(config.distill.alpha), float(config.distill.temperature))


def load_teacher(config: ml_collections.ConfigDict, mesh, num_classes: int, *,
                 platform: Optional[str] = None, abstract: bool = False) -> step_lib.Distillation:
  """The frozen teacher of `config.distill`: any checkpoint `read_checkpoint` reads (a run workdir,
  .npz, timm or Hugging Face directory) of any family, its parameters placed on the mesh with its
  family's sharding rules (`abstract`: only their shapes, for a plan). Its input is adapted to the
  student's batch (`teacher_input_fn`)."""
  from vit_jax.checkpoints import read_checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  path = config.distill.teacher
  ckpt = read_checkpoint(path)
  arch = ckpt.architecture or registry.detect(ckpt.params).infer(ckpt.params)
  if arch.num_classes != num_classes:
    raise ValueError(f'the teacher {path} predicts {arch.num_classes} classes, the student\'s '
                     f'dataset has {num_classes}: distil from a teacher of the same classes')
  family = arch.get_family()
  tree = family.to_module_layout(params_lib.unflatten(ckpt.params), arch.model_config)
  logging.info('distillation (%s, alpha %g, T %g) from %s: %s %s at %s, %d channels',
               config.distill.kind, config.distill.alpha, config.distill.temperature, path,
               family.name, arch.name, arch.image_size, arch.channels)
  return _distillation(config, arch, tree, mesh, platform, abstract)


def abstract_teacher(config: ml_collections.ConfigDict, mesh, num_classes: int, model_name: str,
                     *, platform: Optional[str] = None) -> step_lib.Distillation:
  """A teacher of the registered architecture `model_name` at the student's image size and
  channels, parameters as shapes only: plans a distillation run without a teacher checkpoint."""
  family = registry.family_of(model_name)
  fields = dict(registry.get_model_config(model_name))
  fields.pop('family', None)
  arch = Architecture(fields, num_classes, hw(config.image_size), config.channels, family.name)
  model = arch.create_model()
  shape = (1, *arch.image_size, arch.channels)
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape))['params'])
  return _distillation(config, arch, tree, mesh, platform, abstract=True)


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
  """What `build_training` returns. abstract_state: the TrainState as ShapeDtypeStructs with their
  shardings (the target of a restore, the input of a plan); shardings: the same tree of
  NamedShardings; input_shape: [1, H, W, C] of one image; distill: the teacher or None;
  train_step(state, batch) and eval_step(params, batch): the jitted steps."""
  config: ml_collections.ConfigDict
  mesh: Any
  family: Family
  model: Any
  fields: dict[str, Any]
  num_classes: int
  schedule: Callable
  tx: Any
  use_ema: bool
  input_shape: tuple[int, ...]
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  distill: Optional[step_lib.Distillation]
  train_step: Callable
  eval_step: Callable

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One global training batch as the loader yields it: {'image': f32 [B, H, W, C],
    'labels': f32 [B, K]}, sharded over the batch axes."""
    sharding = sharding_lib.batch_sharding(self.mesh)
    b = self.config.batch_size
    return {'image': jax.ShapeDtypeStruct((b, *self.input_shape[1:]), jnp.float32,
                                          sharding=sharding),
            'labels': jax.ShapeDtypeStruct((b, self.num_classes), jnp.float32, sharding=sharding)}

  def lower(self):
    """The train step lowered for the abstract state and batch (nothing allocated)."""
    return self.train_step.lower(self.abstract_state, self.abstract_batch())


def build_training(config: ml_collections.ConfigDict, num_classes: int, *,
                   devices: Optional[Sequence[Any]] = None, abstract: bool = False,
                   teacher_model: Optional[str] = None) -> Training:
  """Mesh, model, schedule, optimizer, abstract state and shardings, teacher and jitted steps of
  `config` for a dataset of `num_classes`.

  devices: the mesh's devices (default: all of `jax.devices()`); a plan passes a topology's
  (compile-only TPU devices, or fake CPU ones), and `config.dtype='auto'` follows their platform.
  abstract: the teacher (`config.distill.teacher`) as shapes only; teacher_model: a registered
  architecture to plan distillation with when there is no teacher checkpoint.
  """
  devices = list(jax.devices() if devices is None else devices)
  platform = devices[0].platform
  if not abstract:
    runtime.tune_for_backend(platform)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  family, model, fields = build_model(config, num_classes, platform)
  schedule = optim.make_schedule(config.base_lr, config.total_steps, config.warmup_steps,
                                 config.lr_decay, config.end_lr)
  tx = optim.make_optimizer(config, schedule)
  use_ema = bool(config.ema_decay)
  input_shape = (1, *hw(config.image_size), config.channels)
  check_batch_sizes(config, mesh)
  abstract_state, shardings = state_lib.abstract_state(
      model, tx, input_shape, config.seed, mesh, use_ema=use_ema,
      fsdp_min_size=config.fsdp_min_size, tensor_rules=family.tensor_rules)

  distill = None
  if teacher_model:
    distill = abstract_teacher(config, mesh, num_classes, teacher_model, platform=platform)
  elif config.get('distill') is not None and config.distill.teacher:
    distill = load_teacher(config, mesh, num_classes, platform=platform, abstract=abstract)
  train_step = step_lib.make_train_step(
      model, tx, schedule, mesh, shardings, loss=config.loss,
      label_smoothing=config.label_smoothing, accum_steps=config.accum_steps,
      ema_decay=config.ema_decay if use_ema else None, distill=distill,
      skip_nonfinite=bool(config.get('skip_nonfinite', False)))
  eval_step = step_lib.make_eval_step(model, mesh, shardings.params)
  return Training(config, mesh, family, model, fields, num_classes, schedule, tx, use_ema,
                  input_shape, abstract_state, shardings, distill, train_step, eval_step)
