"""The training loop: build, resume, train, evaluate, log, checkpoint, handle preemption.

train_and_evaluate(config, workdir) reads top to bottom:
  1. mesh, data sources, model, optimizer
  2. state: restored from workdir/checkpoints if one exists (with the data pipeline's position),
     else initialised (optionally from `config.pretrained`), always directly in its sharded layout
  3. steps: one jitted train step per global batch; a non-finite loss stops the run naming the step
     (with `config.distill.teacher`, a frozen teacher runs inside it: `load_teacher`)
  4. every `log_every` steps metrics.jsonl + TensorBoard; every `eval_every` the full eval split;
     every `checkpoint_every` an asynchronous checkpoint; SIGTERM saves one and returns
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import data
from vit_jax import sharding as sharding_lib
from vit_jax.checkpoints import manager as ckpt_lib
from vit_jax.families import registry
from vit_jax.families.base import Architecture, Family, hw
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import optim
from vit_jax.train import state as state_lib
from vit_jax.train import step as step_lib

class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  """What a finished (or preempted) run reports."""
  step: int
  preempted: bool = False
  eval: dict[str, float] = dataclasses.field(default_factory=dict)
  train_loss: Optional[float] = None
  seconds: float = 0.0
  skipped_images: int = 0


def compute_dtype(name: str):
  """'auto' -> bfloat16 on GPU/TPU, float32 on CPU (where bf16 matmuls are emulated and slow)."""
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> tuple[Family, Any, dict]:
  """(family, module, fields) of `config.model` (registry name plus overrides) for `num_classes`."""
  family, fields = registry.resolve(config.model)
  return family, family.create(fields, num_classes, dtype=compute_dtype(config.dtype)), fields


def load_teacher(config: ml_collections.ConfigDict, mesh, num_classes: int
                 ) -> step_lib.Distillation:
  """The frozen teacher of `config.distill`: any checkpoint `read_checkpoint` reads (a run workdir,
  .npz, timm or Hugging Face directory) of any family, its parameters placed on the mesh with its
  family's sharding rules. Its input is adapted to the student's batch (`teacher_input_fn`)."""
  from vit_jax.checkpoints import read_checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  path = config.distill.teacher
  ckpt = read_checkpoint(path)
  arch = ckpt.architecture or registry.detect(ckpt.params).infer(ckpt.params)
  if arch.num_classes != num_classes:
    raise ValueError(f'the teacher {path} predicts {arch.num_classes} classes, the student\'s '
                     f'dataset has {num_classes}: distil from a teacher of the same classes')
  family = arch.get_family()
  model = arch.create_model(dtype=compute_dtype(config.dtype))
  tree = family.to_module_layout(params_lib.unflatten(ckpt.params), arch.model_config)
  shardings = sharding_lib.tree_shardings(tree, mesh, config.fsdp_min_size, family.tensor_rules)
  params = jax.device_put(tree, shardings)
  input_fn = step_lib.teacher_input_fn(hw(config.image_size), config.channels, arch.image_size,
                                       arch.channels, arch.mean, arch.std)
  logging.info('distillation (%s, alpha %g, T %g) from %s: %s %s at %s, %d channels',
               config.distill.kind, config.distill.alpha, config.distill.temperature, path,
               family.name, arch.name, arch.image_size, arch.channels)
  return step_lib.Distillation(model, params, shardings, input_fn, config.distill.kind,
                               float(config.distill.alpha), float(config.distill.temperature))


def run_meta(config, family: Family, fields: dict[str, Any], train_src) -> dict[str, Any]:
  """JSON saved with each checkpoint: the run's config, the class names and the architecture (the
  one metadata schema, `Architecture.to_meta()`), which records the family and its fields."""
  arch = Architecture(dict(fields), train_src.num_classes, hw(config.image_size), config.channels,
                      family.name)
  return {'config': json.loads(config.to_json_best_effort()), 'architecture': arch.to_meta(),
          'class_names': train_src.class_names}


def _sources(config):
  kw = dict(data_dir=config.data_dir, held_out=config.held_out, seed=config.seed)
  train_src = data.get_source(config.dataset, split=config.train_split, **kw)
  eval_src = data.get_source(config.dataset, split=config.eval_split, **kw)
  return train_src, eval_src


def _augment(config) -> dict[str, Any]:
  aug: dict[str, Any] = {'preset': config.augment, 'mixup': config.mixup, 'cutmix': config.cutmix}
  if config.randaugment:
    layers, magnitude = (int(v) for v in str(config.randaugment).split(','))
    aug['randaugment'] = {'num_layers': layers, 'magnitude': magnitude}
  return aug


def evaluate(eval_step, params, eval_it) -> dict[str, float]:
  """top-1, top-5 and loss over every example of the split exactly once (padding masked)."""
  totals = None
  for batch in eval_it:
    out = eval_step(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals['count'])
  return {'eval_loss': float(totals['loss']) / n, 'eval_top1': float(totals['top1']) / n,
          'eval_top5': float(totals['top5']) / n, 'eval_count': int(n)}


class _Preemption:
  """SIGTERM sets a flag; with several processes all agree on the step at which to stop."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a worker): no handler
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return self.requested or multihost_utils.reached_preemption_sync_point(step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint when there is one."""
  t_start = time.time()
  is_main = jax.process_index() == 0
  size = hw(config.image_size)

  # 1. Mesh, data, model, optimizer.
  mesh = sharding_lib.make_mesh(config.mesh)
  train_src, eval_src = _sources(config)
  num_classes = train_src.num_classes
  family, model, fields = build_model(config, num_classes)
  schedule = optim.make_schedule(config.base_lr, config.total_steps, config.warmup_steps,
                                 config.lr_decay, config.end_lr)
  tx = optim.make_optimizer(config, schedule)
  use_ema = bool(config.ema_decay)
  input_shape = (1, *size, config.channels)
  _check_batch_sizes(config, mesh)

  # 2. State: resume, or initialise (from pretrained weights when asked).
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                                    keep_last=config.keep_last, keep_every=config.keep_every,
                                    keep_best=config.keep_best,
                                    async_save=config.async_checkpoints)
  data_state = None
  if ckpt.latest_step() is not None:
    abstract, shardings = state_lib.abstract_state(
        model, tx, input_shape, config.seed, mesh, use_ema=use_ema,
        fsdp_min_size=config.fsdp_min_size, tensor_rules=family.tensor_rules)
    state, data_state, _, restored = ckpt.restore(abstract)
    logging.info('resumed from %s step %d', ckpt.directory, restored)
  else:
    init_params = None
    if config.pretrained:
      from vit_jax.checkpoints import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
      # The target tree (new head, new grid) that the checkpoint is adapted to, on the host.
      fresh = jax.jit(lambda: model.init(jax.random.PRNGKey(config.seed),
                                         jnp.zeros(input_shape))['params'])()
      init_params, _ = pretrained_lib.load_pretrained(
          config.pretrained, fresh, model=model, image_size=size,
          keep_pre_logits=config.keep_pre_logits, posemb_resize=config.posemb_resize)
    state, shardings = state_lib.create_train_state(
        model, tx, input_shape, config.seed, mesh, use_ema=use_ema,
        fsdp_min_size=config.fsdp_min_size, init_params=init_params,
        tensor_rules=family.tensor_rules)
  start_step = int(jax.device_get(state.step))

  distill = None
  if config.get('distill') is not None and config.distill.teacher:
    distill = load_teacher(config, mesh, num_classes)
  train_step = step_lib.make_train_step(
      model, tx, schedule, mesh, shardings, loss=config.loss,
      label_smoothing=config.label_smoothing, accum_steps=config.accum_steps,
      ema_decay=config.ema_decay if use_ema else None, distill=distill)
  eval_step = step_lib.make_eval_step(model, mesh, shardings.params)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  train_it = data.train_iterator(
      train_src, image_size=size, channels=config.channels, global_batch_size=config.batch_size,
      seed=config.seed, augment=_augment(config), num_classes=num_classes,
      sharding=batch_sharding, workers=config.workers, prefetch=config.prefetch)
  if data_state:
    train_it.set_state(data_state)
  eval_bs = config.eval_batch_size or config.batch_size
  make_eval_it = lambda: data.eval_batches(
      eval_src, image_size=size, channels=config.channels, global_batch_size=eval_bs,
      sharding=batch_sharding, crop=config.eval_crop, workers=config.workers,
      prefetch=config.prefetch)

  meta = run_meta(config, family, fields, train_src)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  bar = metrics_lib.ProgressBar(config.total_steps, start_step, enabled=is_main and config.progress)
  result = RunResult(step=start_step)
  eval_params = lambda s: s.ema_params if use_ema else s.params

  def save(step: int, metrics: Optional[dict] = None) -> None:
    ckpt.save(step, state, train_it.get_state(), meta, metrics)

  # 3-4. Steps.
  pending = None  # (step, metrics) of the previous step, checked with a one-step lag
  last_log_t, last_log_step = time.time(), start_step
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, config.total_steps + 1):
        batch = next(train_it)
        state, metrics = train_step(state, batch)
        if pending is not None:
          _check_finite(*pending)
        pending = (step, metrics)
        due = lambda every: (every and step % every == 0) or step == config.total_steps

        if due(config.log_every) or due(config.eval_every) or due(config.checkpoint_every):
          _check_finite(step, metrics)
          values = jax.device_get(metrics)
          now = time.time()
          img_per_s = (step - last_log_step) * config.batch_size / max(now - last_log_t, 1e-9)
          result.train_loss = float(values['loss'])
          row = {**{k: float(v) for k, v in values.items()}, 'img_per_s': img_per_s,
                 'skipped_images': train_it.skipped_images}
          if due(config.eval_every):
            eval_it = make_eval_it()
            result.eval = evaluate(eval_step, eval_params(state), eval_it)
            row.update(result.eval)
            row['skipped_images'] += eval_it.skipped_images
            eval_it.close()
            logging.info('step %d: %s', step, {k: round(v, 4) for k, v in result.eval.items()})
          writer.write(step, row)
          bar.update(step, result.train_loss, img_per_s, force=True)
          if due(config.checkpoint_every):
            save(step, {'eval_top1': result.eval['eval_top1']} if due(config.eval_every) else None)
          last_log_t, last_log_step = time.time(), step
        else:
          bar.update(step, result.train_loss, None)
        result.step = step

        if preemption.should_stop(step):
          _check_finite(step, metrics)
          logging.warning('preempted (SIGTERM): saving step %d and stopping', step)
          save(step)
          result.preempted = True
          break
  finally:
    bar.close()
    ckpt.close()  # waits for asynchronous saves
    writer.close()
    train_it.close()
  result.seconds = time.time() - t_start
  result.skipped_images = train_it.skipped_images
  return result


def _check_batch_sizes(config, mesh) -> None:
  """Batches must split evenly over processes and the mesh's batch axes; say so before training."""
  shards = math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)
  shards = math.lcm(shards, jax.process_count())
  micro = config.batch_size // config.accum_steps
  if config.batch_size % config.accum_steps or micro % shards:
    raise ValueError(f'batch_size {config.batch_size} / accum_steps {config.accum_steps} = {micro} '
                     f'must be a multiple of {shards} (devices on the data/fsdp axes and '
                     f'processes); change --config.batch_size')
  eval_bs = config.eval_batch_size or config.batch_size
  if eval_bs % shards:
    raise ValueError(f'eval_batch_size {eval_bs} must be a multiple of {shards} (devices on the '
                     f'data/fsdp axes and processes); change --config.eval_batch_size')


def _check_finite(step: int, metrics: dict) -> None:
  loss = float(jax.device_get(metrics['loss']))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'loss is {loss} at step {step}; stopping. The last good checkpoint is kept. '
        'Lower base_lr, raise warmup_steps, or check the data.')
