"""The training loop: build, resume, train, evaluate, log, checkpoint, handle preemption.

train_and_evaluate(config, workdir) reads top to bottom:
  1. mesh, data sources, model, optimizer
  2. state: restored from workdir/checkpoints if one exists (with the data pipeline's position),
     else initialised (optionally from `config.pretrained`), always directly in its sharded layout
  3. steps: one jitted train step per global batch (with `config.distill.teacher`, a frozen
     teacher runs inside it); a non-finite loss or gradient stops the run naming the step, or with
     `config.skip_nonfinite` that step leaves the state unchanged and is counted (`skipped_updates`)
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
from vit_jax.eval import fewshot as fewshot_lib
from vit_jax.families.base import Architecture, Family, hw
from vit_jax.train import build as build_lib
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import state as state_lib

class NonFiniteLossError(FloatingPointError):
  """The training loss or gradients became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
  """What a finished (or preempted) run reports."""
  step: int
  preempted: bool = False
  eval: dict[str, float] = dataclasses.field(default_factory=dict)
  train_loss: Optional[float] = None
  seconds: float = 0.0
  skipped_images: int = 0
  skipped_updates: int = 0   # steps whose non-finite update was skipped (config.skip_nonfinite)


# Built in vit_jax.train.build (shared with vit_jax.plan); kept importable from here.
compute_dtype = build_lib.compute_dtype
build_model = build_lib.build_model
load_teacher = build_lib.load_teacher


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
  logging.info('evaluating')  # with the results line after it, brackets the evaluation in the log
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

  # 1. Data; then mesh, model, optimizer, abstract state, teacher and jitted steps (the same
  # `build_training` that `vit_jax.plan` compiles ahead of time).
  train_src, eval_src = _sources(config)
  num_classes = train_src.num_classes
  built = build_lib.build_training(config, num_classes)
  mesh, family, model, fields = built.mesh, built.family, built.model, built.fields
  tx, use_ema, input_shape = built.tx, built.use_ema, built.input_shape

  # 2. State: resume, or initialise (from pretrained weights when asked).
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                                    keep_last=config.keep_last, keep_every=config.keep_every,
                                    keep_best=config.keep_best,
                                    async_save=config.async_checkpoints)
  data_state = None
  if ckpt.latest_step() is not None:
    shardings = built.shardings
    state, data_state, _, restored = ckpt.restore(built.abstract_state)
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
  assert shardings == built.shardings  # the layout the jitted steps were built for
  train_step, eval_step = built.train_step, built.eval_step
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
  skipped: set[int] = set()  # steps whose update was skipped (skip_nonfinite)
  fewshot = fewshot_lib.from_config(config, model, mesh, shardings.params)  # None: off
  last_log_t, last_log_step = time.time(), start_step
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, config.total_steps + 1):
        batch = next(train_it)
        state, metrics = train_step(state, batch)
        if pending is not None:
          _check_finite(*pending, skipped)
        pending = (step, metrics)
        due = lambda every: (every and step % every == 0) or step == config.total_steps
        fewshot_due = fewshot is not None and due(fewshot.every or config.eval_every)

        if (due(config.log_every) or due(config.eval_every) or due(config.checkpoint_every)
            or fewshot_due):
          _check_finite(step, metrics, skipped)
          values = jax.device_get(metrics)
          now = time.time()
          img_per_s = (step - last_log_step) * config.batch_size / max(now - last_log_t, 1e-9)
          result.train_loss = float(values['loss'])
          row = {**{k: float(v) for k, v in values.items() if k != 'skipped'},
                 'img_per_s': img_per_s, 'skipped_images': train_it.skipped_images,
                 'skipped_updates': len(skipped)}
          if due(config.eval_every):
            eval_it = make_eval_it()
            result.eval = evaluate(eval_step, eval_params(state), eval_it)
            row.update(result.eval)
            row['skipped_images'] += eval_it.skipped_images
            eval_it.close()
            logging.info('step %d: %s', step, {k: round(v, 4) for k, v in result.eval.items()})
          if fewshot_due:  # reads the parameters only: the trajectory is unchanged
            row.update(fewshot(eval_params(state)))
          writer.write(step, row)
          bar.update(step, result.train_loss, img_per_s, force=True)
          if due(config.checkpoint_every):
            save(step, {'eval_top1': result.eval['eval_top1']} if due(config.eval_every) else None)
          last_log_t, last_log_step = time.time(), step
        else:
          bar.update(step, result.train_loss, None)
        result.step = step

        if preemption.should_stop(step):
          _check_finite(step, metrics, skipped)
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
  result.skipped_updates = len(skipped)
  return result


def _check_finite(step: int, metrics: dict, skipped: Optional[set[int]] = None) -> None:
  """NonFiniteLossError naming `step` when its loss or global gradient norm is NaN/inf, unless the
  step skipped that update (`skipped` metric, config.skip_nonfinite): then it joins `skipped`
  (a set, as a step may be checked twice) with one warning."""
  values = jax.device_get({k: metrics[k] for k in ('loss', 'grad_norm', 'skipped') if k in metrics})
  loss, norm = float(values['loss']), float(values.get('grad_norm', 0.0))
  if values.get('skipped'):
    if skipped is not None and step not in skipped:
      skipped.add(step)
      logging.warning('step %d: loss %s, gradient norm %s; update skipped (skip_nonfinite), %d '
                      'so far', step, loss, norm, len(skipped))
    return
  if not (math.isfinite(loss) and math.isfinite(norm)):
    what = (f'loss is {loss}' if not math.isfinite(loss)
            else f'gradient norm is {norm} (loss {loss})')
    raise NonFiniteLossError(
        f'{what} at step {step}; stopping. The last good checkpoint is kept. '
        'Lower base_lr, raise warmup_steps, or check the data; --config.skip_nonfinite=True '
        'skips such updates instead.')
