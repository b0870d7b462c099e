"""Training checkpoints with orbax: asynchronous saves, keep-N retention, best-by-accuracy, exact resume.

Layout: `workdir/checkpoints/<step>/` holding three items:
  state  the TrainState (params, optimizer state, step, rng, EMA), each process writing its shards;
  data   the input pipeline's state (JSON), so a resumed run continues with exactly the next batch;
  meta   JSON: the run's config, class names, and what is needed to rebuild the model.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
mid-save leaves no directory that looks finished; `restore` also falls back to the previous step if
the newest one cannot be read or is corrupted: every checkpoint carries a fingerprint of its arrays
(`integrity.py`), checked on reading, since orbax itself restores flipped bits without complaint.

A full disk during a save (often found only later, when the asynchronous write fails) stops the
run with `DiskFullError`, which names the directory, the free space and the size of a checkpoint.
The run does not retry: the previous checkpoint is intact, the half-written one is ignored (and
deleted) by the next run, and the same command resumes once space is freed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Optional

from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vit_jax.checkpoints import integrity
from vit_jax.models import params as params_lib

CHECKPOINT_DIR = 'checkpoints'


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete or does not fit the model."""


class DiskFullError(CheckpointError):
  """The filesystem of the checkpoint directory ran out of space while a checkpoint was written."""


def is_disk_full(e: Optional[BaseException]) -> bool:
  """Whether `e` or an exception it was raised from is ENOSPC. Orbax (tensorstore) reports it as a
  ValueError whose text carries the OS error, Python as OSError(errno.ENOSPC)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if os.strerror(errno.ENOSPC) in str(e):  # 'No space left on device'
      return True
    e = e.__cause__ or e.__context__
  return False


def _allocated_bytes(path: str) -> int:
  """Disk space the files under `path` occupy (blocks, not apparent sizes)."""
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.lstat(os.path.join(root, f)).st_blocks * 512
      except OSError:
        pass
  return total


def _mb(n: float) -> str:
  return f'{n / 2 ** 20:.2f} MiB'


def checkpoint_dir(path: str) -> str:
  """The orbax root for a workdir or a checkpoints directory (returned unchanged)."""
  path = os.path.abspath(os.fspath(path))
  sub = os.path.join(path, CHECKPOINT_DIR)
  return sub if os.path.isdir(sub) else path


class CheckpointManager:
  """Saves and restores training checkpoints under `directory` (usually `workdir/checkpoints`).

  Retention: the latest `keep_last`, every `keep_every`-th step (0: none), and the best by
  `best_metric` (the objective's: `eval_top1` for classification) when `keep_best`, the highest
  (`best_mode='max'`) or lowest ('min'). Saves are asynchronous; `wait()` blocks until they are on
  disk.
  """

  def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0,
               keep_best: bool = True, async_save: bool = True, best_metric: str = 'eval_top1',
               best_mode: str = 'max'):
    self.directory = os.path.abspath(directory)
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode {best_mode!r}: 'max' or 'min'")
    policies = [pp.LatestN(n=max(1, keep_last))]
    if keep_every:
      policies.append(pp.EveryNSteps(interval_steps=keep_every))
    if keep_best:
      sign = 1.0 if best_mode == 'max' else -1.0
      # A step saved with another metric (a run resumed under another objective) ranks last.
      rank = lambda m: sign * m[best_metric] if best_metric in m else -float('inf')
      policies.append(pp.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data', 'meta'))
    self._keep_last = max(1, keep_last)
    self._in_flight: Optional[int] = None   # the step of a save that may still be writing
    self._state_bytes = 0                   # estimate of a checkpoint's size before one exists

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           metrics: Optional[dict] = None) -> None:
    """Starts an (asynchronous) save of `step`. metrics: e.g. {'eval_top1': 0.9} for the best."""
    metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
    self.wait()  # a failure of the previous (asynchronous) save surfaces here, naming its step
    self._state_bytes = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(integrity.seal(meta, state, data_state))), metrics=metrics,
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_disk_full(e, step)
      raise
    self._in_flight = step

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> tuple[Any, dict, dict, int]:
    """(state, data_state, meta, step) of `step` or the newest readable checkpoint.

    abstract_state: ShapeDtypeStructs with shardings (see `train.state.abstract_state`); the state is
    restored directly into that sharding. A newest checkpoint that fails to read, or whose arrays
    no longer match the fingerprint saved with them (`integrity.py`), is logged and skipped in
    favour of the one before it, and moved aside to `<step>.unreadable` (kept for inspection; the
    resumed run writes that step afresh when it gets there).
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    errors = []
    for s in steps:
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        # Bits that orbax restores without complaint can still be wrong: check the fingerprint.
        integrity.check(f'checkpoint step {s} in {self.directory}', out['meta'], out['state'],
                        out['data'])
        if step is None and errors:
          self._set_aside([t for t in steps if t > s])
        return out['state'], out['data'], out['meta'], s
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint step %d in %s cannot be restored (%s); trying the previous one',
                        s, self.directory, e)
        errors.append(f'step {s}: {type(e).__name__}: {e}')
    raise CheckpointError(f'no checkpoint in {self.directory} could be restored:\n' +
                          '\n'.join(errors))

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step directories to `<step>.unreadable[.k]` so that orbax no longer sees
    them (saving that step again would otherwise fail: it exists)."""
    if jax.process_index() == 0:
      for s in steps:
        src = os.path.join(self.directory, str(s))
        dst, k = f'{src}.unreadable', 1
        while os.path.exists(dst):
          dst, k = f'{src}.unreadable.{k}', k + 1
        os.rename(src, dst)
        logging.warning('moved the unreadable checkpoint %s aside to %s', src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('vit_jax: unreadable checkpoints set aside')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; DiskFullError if the disk filled up."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_disk_full(e, self._in_flight)
      raise
    finally:
      self._in_flight = None

  def close(self) -> None:
    """Waits for the save in flight (DiskFullError if it ran out of space), then releases orbax's
    threads. A failure that `save` or `wait` already raised is not raised again."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def _raise_disk_full(self, e: Exception, step: Optional[int]) -> None:
    """Raises DiskFullError (from `e`) when `e` is ENOSPC; otherwise returns."""
    if not is_disk_full(e):
      return
    try:
      free = _mb(shutil.disk_usage(self.directory).free)
    except OSError:
      free = 'unknown'
    done = [s for s in self.all_steps() if s != step]
    if done:
      size = _allocated_bytes(os.path.join(self.directory, str(done[-1])))
      size_from = f'the size of step {done[-1]}'
      kept = f'step {done[-1]} is intact and is where the run resumes'
    else:
      size, size_from = self._state_bytes, 'the size of the training state'
      kept = 'no earlier checkpoint exists; the run restarts from the beginning'
    raise DiskFullError(
        f'no space left on device while writing checkpoint step {step} to {self.directory}: '
        f'{free} free there, and one checkpoint of this run needs about {_mb(size)} '
        f'({size_from}). The run stopped; {kept}, and the half-written step is ignored (and '
        f'deleted) when the run starts again. Free at least {_mb(size)} there (the run keeps '
        f'{self._keep_last} checkpoints and writes each new one before deleting the oldest) and '
        f'run the same command again.') from e


def _step_path(path: str) -> tuple[str, int]:
  """(step directory, step) for a workdir, a checkpoints directory or one step's directory."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointError(f'{path} does not exist; pass a workdir, its checkpoints/ directory, '
                          'or one step directory inside it')
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return path, int(base)
  root = checkpoint_dir(path)
  steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()
                  and os.path.isdir(os.path.join(root, d, 'state'))), reverse=True)
  if not steps:
    raise CheckpointError(f'no finished checkpoint in {root} (expected <step>/state inside)')
  return os.path.join(root, str(steps[0])), steps[0]


def load_params(path: str, which: str = 'params') -> tuple[dict, dict]:
  """(parameters as a nested dict of numpy arrays, meta) from a workdir, checkpoints dir or step dir.

  which: 'params' or 'ema_params'. Needs no model and no mesh: arrays are read whole on the host.
  """
  step_dir, step = _step_path(path)
  quiet = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about item-level metadata files
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(os.path.join(step_dir, 'state'))
      tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata.tree
      if which not in tree or tree[which] is None:
        raise CheckpointError(f'{step_dir} holds no {which!r}')
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      state = ckptr.restore(os.path.join(step_dir, 'state'),
                            args=ocp.args.PyTreeRestore(restore_args=restore_args))
    with open(os.path.join(step_dir, 'meta', 'metadata')) as f:
      meta = json.load(f)
    integrity.check(f'checkpoint {step_dir}', meta, state)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot read checkpoint {step_dir}: {type(e).__name__}: {e}') from e
  finally:
    absl_logging.set_verbosity(quiet)
  meta = dict(meta, step=int(np.asarray(state['step'])) if 'step' in state else step)
  return state[which], meta


def save_params(path: str, params: Any, meta: dict, step: int = 0) -> str:
  """Writes parameters alone as this project's checkpoint (e.g. weights converted from timm/HF).

  `path` becomes a workdir: `path/checkpoints/<step>/{state,data,meta}`, readable by `load_params`,
  `python -m vit_jax.checkpoints info`, `--config.pretrained` and `vit_jax.predict`. Refuses to write
  over an existing checkpoint. Returns the step directory.
  """
  root = os.path.join(os.path.abspath(os.fspath(path)), CHECKPOINT_DIR)
  if os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root)):
    raise CheckpointError(f'{root} already holds checkpoints; choose an empty output directory')
  manager = CheckpointManager(root, keep_last=1, keep_best=False, async_save=False)
  state = {'step': np.asarray(step, np.int32), 'params': jax.tree.map(np.asarray, params)}
  manager.save(step, state, {}, meta)
  manager.close()
  return os.path.join(root, str(step))


def params_digest(params: Any) -> str:
  """sha256 over (path, dtype, shape, bytes) of every parameter in sorted path order.

  The same however the run was sharded: arrays are gathered whole before hashing.
  """
  h = hashlib.sha256()
  for path, leaf in sorted(params_lib.flatten(params).items()):
    arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f'{path}|{arr.dtype.str}|{arr.shape}|'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()
