"""The training loop: build, resume, train, evaluate, log, checkpoint, handle preemption.

train_and_evaluate(config, workdir) reads top to bottom:
  1. mesh, data sources, model, objective, optimizer
  2. state: restored from workdir/checkpoints if one exists (with the data pipeline's position),
     else initialised (optionally from `config.pretrained`), always directly in its sharded layout;
     parameters the objective freezes are loaded from `config.pretrained` into the frozen extras
     (never checkpointed: the checkpoint records the file and its sha256, checked on resuming)
  3. steps: one jitted train step per global batch (the objective's loss; its frozen extras, such as
     a distillation teacher, run inside it); a non-finite loss or gradient stops the run naming the
     step, or with `config.skip_nonfinite` that step leaves the state unchanged and is counted
     (`skipped_updates`)
  4. every `log_every` steps metrics.jsonl + TensorBoard; every `eval_every` the objective's
     evaluation of the full eval split; every `checkpoint_every` an asynchronous checkpoint (the
     best by the objective's metric kept); SIGTERM saves one and returns
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
from vit_jax import objectives
from vit_jax import sharding as sharding_lib
from vit_jax.checkpoints import manager as ckpt_lib
from vit_jax.eval import fewshot as fewshot_lib
from vit_jax.families.base import Architecture, Family
from vit_jax.shapes import hw
from vit_jax.models import params as params_lib
from vit_jax.objectives.base import OBJECTIVE_KEY, Objective, frozen_digest, model_params
from vit_jax.train import build as build_lib
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import state as state_lib

class NonFiniteLossError(FloatingPointError):
  """The training loss or gradients became NaN or infinite."""


class DataError(ValueError):
  """The data cannot serve the run (an unlabelled dataset for an objective that needs labels)."""


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


def run_meta(config, family: Family, fields: dict[str, Any], train_src,
             objective: Optional[Objective] = None, frozen_from: Optional[dict] = None
             ) -> dict[str, Any]:
  """JSON saved with each checkpoint: the run's config, the class names, the architecture (the
  one metadata schema, `Architecture.to_meta()`, which records the family and its fields) and the
  objective (its name and block; `frozen_from`: where the frozen parameters come from)."""
  classes = objective.head_classes() if objective is not None else train_src.num_classes
  arch = Architecture(dict(fields), classes, hw(config.image_size), config.channels, family.name)
  meta = {'config': json.loads(config.to_json_best_effort()), 'architecture': arch.to_meta(),
          'class_names': train_src.class_names if classes else None}
  if objective is not None:
    meta['objective'] = objective.meta()
    if frozen_from:
      meta['objective']['frozen_from'] = frozen_from
  return meta


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


def evaluate(eval_step, params, eval_it, objective: Optional[Objective] = None) -> dict[str, float]:
  """The objective's evaluation over every example of the split exactly once (padding masked):
  classification's top-1, top-5 and loss by default."""
  logging.info('evaluating')  # with the results line after it, brackets the evaluation in the log
  totals = None
  for index, batch in enumerate(eval_it):
    out = eval_step(params, batch, index)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  if objective is not None:
    return objective.eval_summary(totals)
  n = float(totals['count'])
  return {'eval_loss': float(totals['loss']) / n, 'eval_top1': float(totals['top1']) / n,
          'eval_top5': float(totals['top5']) / n, 'eval_count': int(n)}


def _frozen_params(config, built: build_lib.Training, restored_meta: Optional[dict],
                   tree: Any = None) -> tuple[Any, Optional[dict]]:
  """(frozen model parameters on the host, their source {'path', 'sha256'}) for an objective that
  freezes part of the model: the pretrained checkpoint adapted exactly as for fine-tuning (`tree`,
  when already read). A resumed run checks that the file still holds what the run started from."""
  tree = _pretrained_tree(config, built) if tree is None else tree
  frozen = built.objective.frozen_params(tree)
  flat = params_lib.flatten_numpy(built.family.to_file_layout(frozen))
  source = {'path': os.path.abspath(config.pretrained), 'sha256': frozen_digest(flat)}
  recorded = ((restored_meta or {}).get('objective') or {}).get('frozen_from')
  if recorded and recorded.get('sha256') != source['sha256']:
    raise ckpt_lib.CheckpointError(
        f'the frozen parameters of this run come from {recorded.get("path")} (sha256 '
        f'{recorded.get("sha256")}), but {config.pretrained} now gives sha256 '
        f'{source["sha256"]}: restore the file the run started from, or start a new workdir')
  return frozen, source


def _pretrained_tree(config, built: build_lib.Training) -> Any:
  """The model's parameters from `config.pretrained`, adapted to this model (host arrays)."""
  from vit_jax.checkpoints import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  model = built.model
  # The target tree (new head, new grid) that the checkpoint is adapted to, on the host.
  fresh = jax.jit(lambda: model.init(jax.random.PRNGKey(config.seed),
                                     jnp.zeros(built.input_shape))['params'])()
  tree, _ = pretrained_lib.load_pretrained(
      config.pretrained, fresh, model=model, image_size=hw(config.image_size),
      keep_pre_logits=config.keep_pre_logits, posemb_resize=config.posemb_resize)
  return tree


def _model_shardings(built: build_lib.Training) -> Any:
  """Shardings of the model's whole parameter tree (trainable and frozen)."""
  return model_params(built.shardings.params, built.extras_shardings)


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
  labels = objectives.get(objectives.name_of(config)).uses_labels
  if labels and not num_classes:
    raise DataError(f'the dataset {config.dataset!r} has no labels, and objective '
                     f'{objectives.name_of(config)!r} trains on labels: label it (one folder per '
                     'class), or choose an objective that needs none (mpp, mae)')
  built = build_lib.build_training(config, num_classes)
  mesh, family, model, fields = built.mesh, built.family, built.model, built.fields
  tx, use_ema, input_shape, objective = built.tx, built.use_ema, built.input_shape, built.objective

  # 2. State: resume, or initialise (from pretrained weights when asked).
  ckpt = ckpt_lib.CheckpointManager(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR),
                                    keep_last=config.keep_last, keep_every=config.keep_every,
                                    keep_best=config.keep_best,
                                    async_save=config.async_checkpoints,
                                    best_metric=objective.best_metric,
                                    best_mode=objective.best_mode)
  data_state, restored_meta, model_tree = None, None, None
  if ckpt.latest_step() is not None:
    shardings = built.shardings
    state, data_state, restored_meta, restored = ckpt.restore(built.abstract_state)
    logging.info('resumed from %s step %d', ckpt.directory, restored)
  else:
    if config.pretrained:
      model_tree = _pretrained_tree(config, built)
    state, shardings = state_lib.create_train_state(
        model, tx, input_shape, config.seed, mesh, use_ema=use_ema,
        fsdp_min_size=config.fsdp_min_size, init_params=model_tree,
        tensor_rules=tuple(family.tensor_rules) + tuple(objective.tensor_rules),
        objective=objective)
  if model_tree is not None and OBJECTIVE_KEY in state.params:  # what the objective adds
    added = sorted(f'{OBJECTIVE_KEY}/{k}' for k in params_lib.flatten(state.params[OBJECTIVE_KEY]))
    logging.info('objective %s adds its own parameters, from their initialisation: %s',
                 objective.name, ', '.join(added))
  frozen_from = None
  if objective.freezes():  # the frozen parameters: never in a checkpoint, loaded again here
    frozen, frozen_from = _frozen_params(config, built, restored_meta, model_tree)
    built = built.with_frozen(frozen)
    del frozen, model_tree
  start_step = int(jax.device_get(state.step))
  assert shardings == built.shardings  # the layout the jitted steps were built for
  train_step, eval_step = built.train_step, built.eval_step
  batch_sharding = sharding_lib.batch_sharding(mesh)
  train_it = data.train_iterator(
      train_src, image_size=size, channels=config.channels, global_batch_size=config.batch_size,
      seed=config.seed, augment=_augment(config), num_classes=num_classes,
      sharding=batch_sharding, workers=config.workers, prefetch=config.prefetch, labels=labels)
  if data_state:
    train_it.set_state(data_state)
  eval_bs = config.eval_batch_size or config.batch_size
  make_eval_it = lambda: data.eval_batches(
      eval_src, image_size=size, channels=config.channels, global_batch_size=eval_bs,
      sharding=batch_sharding, crop=config.eval_crop, workers=config.workers,
      prefetch=config.prefetch, labels=objective.eval_labels())

  meta = run_meta(config, family, fields, train_src, objective, frozen_from)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  bar = metrics_lib.ProgressBar(config.total_steps, start_step, enabled=is_main and config.progress)
  result = RunResult(step=start_step)
  eval_params = lambda s: s.ema_params if use_ema else s.params

  def save(step: int, metrics: Optional[dict] = None) -> None:
    ckpt.save(step, state, train_it.get_state(), meta, metrics)

  # 3-4. Steps.
  pending = None  # (step, metrics) of the previous step, checked with a one-step lag
  skipped: set[int] = set()  # steps whose update was skipped (skip_nonfinite)
  fewshot = fewshot_lib.from_config(config, model, mesh, _model_shardings(built))  # None: off
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
            result.eval = evaluate(eval_step, eval_params(state), eval_it, objective)
            row.update(result.eval)
            row['skipped_images'] += eval_it.skipped_images
            eval_it.close()
            logging.info('step %d: %s', step, {k: round(v, 4) for k, v in result.eval.items()})
          if fewshot_due:  # reads the parameters only: the trajectory is unchanged
            row.update(fewshot(model_params(eval_params(state), built.extras)))
          writer.write(step, row)
          bar.update(step, result.train_loss, img_per_s, force=True)
          if due(config.checkpoint_every):
            best = objective.best_metric
            save(step, {best: result.eval[best]} if due(config.eval_every) else None)
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
