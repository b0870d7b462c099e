"""The loader: batches made by threads or worker processes, sharded, prefetched, resumable.

`batches.py` defines what batch s holds (a pure function of the seed and s); this module makes the
stream of them: in `workers` grain worker processes (`worker_type='process'`, the default: each
makes whole batches, grain keeps their order) or on decoding threads (`'thread'`: cheaper to start,
but PIL holds the GIL while it decodes a JPEG, so threads only overlap resizing), converted to
global `jax.Array`s (`jax.make_array_from_process_local_data`) and queued `prefetch` batches ahead
by a background thread so the accelerator does not wait on the host. The training state is the
index of the next batch; restoring it restarts the stream there.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from vit_jax.data import augment as aug
from vit_jax.data import preprocess as pp
from vit_jax.data.batches import EvalBatches, TrainBatches
from vit_jax.data.sources import Source

log = logging.getLogger(__name__)
STATE_VERSION = 1
WORKER_TYPES = ('thread', 'process')


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  return p, n


def _globalize(batch: dict[str, np.ndarray], sharding, global_batch_size: int) -> dict[str, Any]:
  """Local numpy shares -> global jax.Arrays of leading dimension `global_batch_size`."""
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
          for k, v in batch.items()}


def _made(make: Callable[[int], Any], start: int, end: float, workers: int, worker_type: str):
  """(iterator over make(start), make(start + 1), ... below end, its close function or None)."""
  if worker_type not in WORKER_TYPES:
    raise ValueError(f'worker_type {worker_type!r} is not one of {WORKER_TYPES}')
  if worker_type == 'process' and workers > 0:
    import grain  # only for process workers
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; defaults are fine outside absl.app
      flags.FLAGS.mark_as_parsed()
    stop = 2**62 if math.isinf(end) else int(end)
    # One batch at a time in each worker (grain's default read-ahead is 16 threads, 500 elements:
    # 500 ImageNet batches). Worker w makes batches start + w, start + w + workers, ...; grain
    # hands them back in order.
    ds = grain.MapDataset.range(start, stop).map(make).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1))
    it = iter(ds)
    return it, getattr(it, 'close', None)
  steps = iter(range(start, 2**62 if math.isinf(end) else int(end)))
  return (make(s) for s in steps), None


class _Stream:
  """Finished batches from step `start` on; `prefetch` > 0 makes them ahead in a daemon thread."""

  def __init__(self, make, start: int, end: float, *, workers: int, worker_type: str,
               prefetch: int, finish: Callable[[Any], Any], on_skipped: Callable[[list], None]):
    # In-memory arrays are augmented whole batches at a time: workers would only copy them around.
    workers = 0 if getattr(make, 'in_memory', False) else workers
    self._it, self._close = _made(make, start, end, workers, worker_type)
    self._finish, self._on_skipped = finish, on_skipped
    self._thread, self._error = None, None
    if prefetch > 0:
      self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._run, daemon=True, name='vit_jax-data-prefetch')
      self._thread.start()

  def _next(self):
    batch, skipped = next(self._it)
    if skipped:
      self._on_skipped(skipped)
    return self._finish(batch)

  def _run(self):
    while not self._stop.is_set():
      try:
        item = (True, self._next())
      except BaseException as e:  # StopIteration included: handed to the consumer, raised there
        item = (False, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if not item[0]:
        return

  def get(self):
    if self._thread is None:
      return self._next()
    if self._error is not None:  # the producer has stopped: keep failing, never block
      raise self._error
    ok, value = self._queue.get()
    if not ok:
      self._error = value
      raise value
    return value

  def close(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self._close is not None:
      self._close()
      self._close = None


class _Skipped:
  """The distinct unreadable files seen so far in this process; warns once about each."""

  def __init__(self):
    self.names: set[str] = set()
    self._lock = threading.Lock()

  def __call__(self, names: list[str]):
    with self._lock:
      for name in names:
        if name not in self.names:
          self.names.add(name)
          log.warning('skipped unreadable image %s (%d skipped so far)', name, len(self.names))


class TrainIterator:
  """Endless training batches `{'image': f32 [B, H, W, C] in [-1, 1], 'labels': f32 [B, K]}`.

  B is the global batch size: with `sharding`, global jax.Arrays built from this process's B / P
  examples; without, NumPy arrays of this process's share. The order is described in `batches.py`.
  """

  def __init__(self, source: Source, *, image_size: int | tuple[int, int], channels: int,
               global_batch_size: int, seed: int, augment: str | Mapping[str, Any] | None,
               num_classes: int, sharding: jax.sharding.Sharding | None = None, workers: int = 0,
               prefetch: int = 2, process_index: int | None = None,
               process_count: int | None = None, worker_type: str = 'process',
               labels: bool = True):
    p, n = _processes(process_index, process_count)
    self.source, self.seed, self.global_batch_size = source, int(seed), int(global_batch_size)
    self.sharding, self.prefetch = sharding, int(prefetch)
    self.workers, self.worker_type = int(workers), worker_type
    self.batches = TrainBatches(
        source, out_hw=pp.as_hw(image_size), channels=int(channels), seed=self.seed,
        cfg=aug.augment_config(augment), num_classes=int(num_classes),
        global_batch_size=self.global_batch_size, process_index=p, process_count=n,
        threads=self.workers if worker_type == 'thread' else 0, labels=labels)
    self._step = 0
    self._stream: _Stream | None = None
    self._skipped = _Skipped()

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of global batch `step` as NumPy arrays; does not move the iterator."""
    pixels, skipped = self.batches(step)
    self._skipped(skipped)
    return self.batches.finish(pixels)

  def _finish(self, pixels: dict[str, np.ndarray]) -> dict[str, Any]:
    return _globalize(self.batches.finish(pixels), self.sharding, self.global_batch_size)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._stream is None:
      self._stream = _Stream(
          self.batches, self._step, math.inf, workers=self.workers, worker_type=self.worker_type,
          prefetch=self.prefetch, on_skipped=self._skipped,
          finish=self._finish)
    batch = self._stream.get()
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Small and JSON-serialisable: restoring it makes the next batch the one that was next here."""
    return {'version': STATE_VERSION, 'step': self._step, 'seed': self.seed,
            'global_batch_size': self.global_batch_size, 'num_examples': len(self.source)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    mine = {'seed': self.seed, 'global_batch_size': self.global_batch_size,
            'num_examples': len(self.source)}
    for key, value in mine.items():
      if key in state and int(state[key]) != value:
        raise ValueError(f'data state was saved with {key}={state[key]}, this pipeline has '
                         f'{value}: restoring it would not continue the same sequence')
    self._close_stream()
    self._step = int(state['step'])

  @property
  def step(self) -> int:
    """Index of the next global batch."""
    return self._step

  @property
  def skipped_images(self) -> int:
    """How many distinct unreadable files this process has skipped so far."""
    return len(self._skipped.names)

  def _close_stream(self):
    if self._stream is not None:
      self._stream.close()
      self._stream = None

  def close(self) -> None:
    self._close_stream()
    self.batches.decoder.close()

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def train_iterator(source: Source, *, image_size: int | tuple[int, int], channels: int,
                   global_batch_size: int, seed: int, augment: str | Mapping[str, Any] | None,
                   num_classes: int, sharding: jax.sharding.Sharding | None = None,
                   workers: int = 0, prefetch: int = 2, process_index: int | None = None,
                   process_count: int | None = None, worker_type: str = 'process',
                   labels: bool = True) -> TrainIterator:
  """Endless, deterministic training batches of `source`; see `TrainIterator` and `batches.py`.

  `augment` is a preset name (`inception_crop`, `none`/`resize`, `resize_flip`, `pad_crop_flip`,
  `randaugment`, `deit`) or a dict of overrides (`augment.DEFAULTS`). `workers` decode files in
  grain worker processes (`worker_type='process'`) or threads (`'thread'`); 0 decodes in the
  prefetch thread. In-memory arrays are augmented a whole batch at a time and ignore `workers`.
  Worker processes are spawned, so a script using them needs the `if __name__ == '__main__':` guard.
  `prefetch` batches are prepared ahead in a background thread (0: on demand).
  `process_index` / `process_count` (this host's share of the global batch) default to JAX's.
  `labels=False`: batches of images alone (objectives without labels; unlabelled sources).
  """
  return TrainIterator(source, image_size=image_size, channels=channels,
                       global_batch_size=global_batch_size, seed=seed, augment=augment,
                       num_classes=num_classes, sharding=sharding, workers=workers,
                       prefetch=prefetch, process_index=process_index,
                       process_count=process_count, worker_type=worker_type, labels=labels)


def num_eval_batches(source_or_size: Source | int, global_batch_size: int) -> int:
  """Global evaluation batches for a split: ceil(N / B), the same on every process."""
  n = source_or_size if isinstance(source_or_size, int) else len(source_or_size)
  return math.ceil(n / global_batch_size)


class EvalIterator:
  """One pass of `{'image': f32 [B, H, W, C], 'label': int32 [B], 'mask': bool [B]}` batches.

  `len()` is the number of global batches, the same on every process. Padding rows (and unreadable
  files, skipped with a warning and counted in `skipped_images`) have mask False and image 0.
  Each `iter()` is a fresh pass.
  """

  def __init__(self, source: Source, *, image_size: int | tuple[int, int], channels: int,
               global_batch_size: int, sharding: jax.sharding.Sharding | None = None,
               crop: bool = False, workers: int = 0, prefetch: int = 2,
               process_index: int | None = None, process_count: int | None = None,
               worker_type: str = 'process', labels: bool = True):
    p, n = _processes(process_index, process_count)
    self.source, self.global_batch_size, self.sharding = source, int(global_batch_size), sharding
    self.workers, self.worker_type, self.prefetch = int(workers), worker_type, int(prefetch)
    self.batches = EvalBatches(
        source, out_hw=pp.as_hw(image_size), channels=int(channels), crop=crop,
        global_batch_size=self.global_batch_size, process_index=p, process_count=n,
        threads=self.workers if worker_type == 'thread' else 0, labels=labels)
    self._skipped = _Skipped()

  def __len__(self) -> int:
    return len(self.batches)

  def _finish(self, pixels: dict[str, np.ndarray]) -> dict[str, Any]:
    return _globalize(self.batches.finish(pixels), self.sharding, self.global_batch_size)

  @property
  def skipped_images(self) -> int:
    return len(self._skipped.names)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    stream = _Stream(self.batches, 0, len(self), workers=self.workers,
                     worker_type=self.worker_type, prefetch=self.prefetch,
                     on_skipped=self._skipped,
                     finish=self._finish)
    try:
      for _ in range(len(self)):
        yield stream.get()
    finally:
      stream.close()

  def close(self) -> None:
    self.batches.decoder.close()


def eval_batches(source: Source, *, image_size: int | tuple[int, int], channels: int,
                 global_batch_size: int, sharding: jax.sharding.Sharding | None = None,
                 crop: bool = False, workers: int = 0, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None,
                 worker_type: str = 'process', labels: bool = True) -> EvalIterator:
  """One pass over `source` in `num_eval_batches(source, global_batch_size)` batches.

  `crop=False` resizes the whole image; `crop=True` resizes the short side to size / 0.875 and takes
  the central crop (the ImageNet evaluation convention). `labels=False`: no 'label' entry. See
  `EvalIterator`.
  """
  return EvalIterator(source, image_size=image_size, channels=channels,
                      global_batch_size=global_batch_size, sharding=sharding, crop=crop,
                      workers=workers, prefetch=prefetch, process_index=process_index,
                      process_count=process_count, worker_type=worker_type, labels=labels)
