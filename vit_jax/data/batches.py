"""What each batch holds: pure functions of (seed, step), picklable so worker processes can run them.

Training reads an endless stream: epoch e is the permutation `rng(seed, e)` of the source, epochs
follow each other without a gap, and global batch s is stream positions [s*B, (s+1)*B). Process p of
P takes the contiguous slice [p*B/P, (p+1)*B/P) of every global batch, so the processes cover each
epoch disjointly and completely. Example randomness comes from `rng(seed, epoch, index)` (decoded
images) or from `rng(seed, step)` drawn for the whole global batch and sliced (in-memory arrays):
a batch depends on (seed, step) only, never on threads, worker processes, timing or the number of
hosts. (Mixup and CutMix pair examples within the process's share; their lambda is shared.)

Evaluation walks the split once in order, in ceil(N / B) global batches; the last is padded, and
`mask` is False on the padding, so every example counts exactly once on any number of processes.

Unreadable files: a training example that fails to decode is replaced by the next index (mod N)
that decodes, so the batch keeps its size and stays a function of the data alone; an evaluation
example that fails is masked out. Every batch also returns the names of the files it skipped.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

from vit_jax.data import augment as aug
from vit_jax.data import preprocess as pp
from vit_jax.data.imageio import BadImageError
from vit_jax.data.sources import ArraySource, Source

# Tags that keep the seed streams of different uses apart: rng([seed, TAG, ...]).
_PERM, _BATCH, _MIX, _EXAMPLE = range(4)
Batch = dict[str, np.ndarray]


class _Decoder:
  """Loads examples of a source, on `threads` threads, remembering which indices are unreadable."""

  def __init__(self, source: Source, threads: int = 0):
    self.source, self.threads = source, threads
    self.bad: dict[int, str] = {}
    self._pool: ThreadPoolExecutor | None = None
    self._lock = threading.Lock()

  def __getstate__(self):  # pools and locks stay behind when sent to a worker process
    return {'source': self.source, 'threads': 0, 'bad': dict(self.bad)}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._pool, self._lock = None, threading.Lock()

  def load(self, index: int, fn: Callable[[Any, str], np.ndarray], skipped: list[str],
           substitute: bool = True):
    """(fn(image, name), label, ok) for `index` (or, substituting, the first good one after it)."""
    n = len(self.source)
    for k in range(n if substitute else 1):
      i = (index + k) % n
      if i in self.bad:
        skipped.append(self.bad[i])
        continue
      try:
        ex = self.source[i]
        return fn(ex['image'], ex.get('name', str(i))), ex['label'], True
      except BadImageError as e:
        with self._lock:
          self.bad[i] = e.name
        skipped.append(e.name)
    if substitute:
      raise RuntimeError(f'no readable image in {self.source!r}: all {n} examples failed to decode')
    return None, 0, False

  def map(self, fn, items) -> list:
    if self.threads <= 0:
      return [fn(x) for x in items]
    if self._pool is None:
      self._pool = ThreadPoolExecutor(self.threads, 'vit_jax-data')
    return list(self._pool.map(fn, items))

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None


def process_share(process_index: int, process_count: int, global_batch_size: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} must divide evenly over '
                     f'{process_count} processes')
  return global_batch_size // process_count


class TrainBatches:
  """`finish(self(step)[0])`: this process's share of global training batch `step`.

  batch = {'image': float32 [B/P, H, W, C] in [-1, 1], 'labels': float32 [B/P, num_classes]}
  ('labels' only with `labels`: an objective that learns from the images alone gets none, and an
  unlabelled source (num_classes 0) has none to give).
  `self(step)` (the decoding, run by workers) also returns the names of the files it skipped.
  """

  def __init__(self, source: Source, *, out_hw: tuple[int, int], channels: int, seed: int,
               cfg: Mapping[str, Any], num_classes: int, global_batch_size: int,
               process_index: int, process_count: int, threads: int = 0, labels: bool = True):
    if len(source) == 0:
      raise ValueError(f'{source!r} has no examples')
    self.source, self.out_hw, self.channels, self.seed = source, out_hw, channels, seed
    self.cfg, self.num_classes, self.global_batch_size = cfg, num_classes, global_batch_size
    self.process_index, self.labels = process_index, bool(labels)
    if self.labels and not num_classes:
      raise ValueError(f'{source!r} has no labels (num_classes 0): ask for batches without them '
                       '(labels=False)')
    self.local_batch_size = process_share(process_index, process_count, global_batch_size)
    self.in_memory = isinstance(source, ArraySource)
    self.decoder = _Decoder(source, 0 if self.in_memory else threads)
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_perms'}

  def __setstate__(self, state):
    self.__dict__.update(state, _perms={})

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, _PERM, epoch]).permutation(len(self.source))
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
      self._perms[epoch] = perm
    return perm

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, source indices) of this process's examples in global batch `step`, [B / P] each."""
    n = len(self.source)
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    pos = start + np.arange(self.local_batch_size)
    epochs = pos // n
    index = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      index[sel] = self._perm(int(e))[pos[sel] % n]
    return epochs, index

  def __call__(self, step: int) -> tuple[Batch, list[str]]:
    """(pixels, skipped names): {'image': uint8 (or float32 when resampled in memory) [B/P, H, W,
    C] in [0, 255], 'label': int64 [B/P], 'step'}; `finish` turns it into the batch.

    The split keeps what crosses from a worker process small: 8-bit pixels are a quarter of float32.
    """
    epochs, index = self.indices(step)
    skipped: list[str] = []
    if self.in_memory:
      images, labels = self._arrays(step, index)
    else:
      images, labels = self._decoded(epochs, index, skipped)
    return {'image': images, 'label': labels, 'step': np.int64(step)}, skipped

  def finish(self, pixels: Batch) -> Batch:
    """Pixels to [-1, 1], labels to one-hot, then Mixup / CutMix (cheap whole-batch NumPy)."""
    labels = pixels['label']
    onehot = np.zeros((len(labels), self.num_classes), np.float32)
    if self.num_classes:
      onehot[np.arange(len(labels)), labels] = 1.0
    images = pp.normalize(pixels['image'])
    if self.cfg['mixup'] or self.cfg['cutmix']:
      rng = np.random.default_rng([self.seed, _MIX, int(pixels['step'])])
      images, onehot = aug.mix_batch(rng, images, onehot, self.cfg)
    return {'image': images, 'labels': onehot} if self.labels else {'image': images}

  def _arrays(self, step: int, index: np.ndarray):
    src: ArraySource = self.source  # type: ignore[assignment]
    _, h, w, _ = src.images.shape
    # Draw for the whole global batch, then keep this process's rows: independent of P.
    rng = np.random.default_rng([self.seed, _BATCH, step])
    d = pp.draw(rng, self.global_batch_size, h, w, self.cfg, self.out_hw)
    lo = self.process_index * self.local_batch_size
    d = {k: v[lo:lo + self.local_batch_size] for k, v in d.items()}
    images = pp.train_batch(src.images[index], d, self.cfg, self.out_hw, self.channels)
    return images, src.labels[index]

  def _decoded(self, epochs: np.ndarray, index: np.ndarray, skipped: list[str]):
    def one(item):
      e, i = item
      rng = np.random.default_rng([self.seed, _EXAMPLE, int(e), int(i)])
      fn = lambda raw, name: pp.train_example(raw, rng, self.cfg, self.out_hw, self.channels, name)
      mine: list[str] = []
      image, label, _ = self.decoder.load(int(i), fn, mine)
      return image, label, mine
    out = self.decoder.map(one, list(zip(epochs, index)))
    for _, _, names in out:
      skipped.extend(names)
    return np.stack([x for x, _, _ in out]), np.array([y for _, y, _ in out], np.int64)


class EvalBatches:
  """`finish(self(k)[0])`: this process's share of evaluation batch k (`self(k)` also returns the
  names of the files it skipped).

  batch = {'image': float32 [B/P, H, W, C] (0 on padding), 'label': int32 [B/P], 'mask': bool [B/P]}
  ('label' only with `labels`).
  """

  def __init__(self, source: Source, *, out_hw: tuple[int, int], channels: int, crop: bool,
               global_batch_size: int, process_index: int, process_count: int, threads: int = 0,
               labels: bool = True):
    self.source, self.out_hw, self.channels, self.crop = source, out_hw, channels, crop
    self.labels = bool(labels)
    self.global_batch_size, self.process_index = global_batch_size, process_index
    self.local_batch_size = process_share(process_index, process_count, global_batch_size)
    self.in_memory = isinstance(source, ArraySource)
    self.decoder = _Decoder(source, 0 if self.in_memory else threads)

  def __len__(self) -> int:
    return -(-len(self.source) // self.global_batch_size)

  def __call__(self, k: int) -> tuple[Batch, list[str]]:
    n = len(self.source)
    pos = (k * self.global_batch_size + self.process_index * self.local_batch_size
           + np.arange(self.local_batch_size))
    mask = pos < n
    index = np.where(mask, pos, 0)
    skipped: list[str] = []
    if self.in_memory:
      src: ArraySource = self.source  # type: ignore[assignment]
      images = pp.eval_batch(src.images[index], self.out_hw, self.channels, self.crop)
      labels = src.labels[index]
    else:
      fn = lambda raw, name: pp.eval_example(raw, self.out_hw, self.channels, self.crop, name)
      blank = np.zeros(self.out_hw + (self.channels,), np.uint8)

      def one(j):
        mine: list[str] = []
        if mask[j]:
          image, label, ok = self.decoder.load(int(index[j]), fn, mine, substitute=False)
          if ok:
            return image, label, True, mine
        return blank, 0, False, mine
      out = self.decoder.map(one, range(len(index)))
      images = np.stack([x[0] for x in out])
      labels = np.array([x[1] for x in out])
      mask = np.array([x[2] for x in out])
      for x in out:
        skipped.extend(x[3])
    labels = np.where(mask, labels, 0).astype(np.int32)
    return {'image': images, 'label': labels, 'mask': mask}, skipped

  def finish(self, pixels: Batch) -> Batch:
    """Pixels to [-1, 1]; padding and unreadable rows to 0."""
    mask = pixels['mask']
    images = np.where(mask[:, None, None, None], pp.normalize(pixels['image']), np.float32(0))
    if not self.labels:
      return {'image': images, 'mask': mask}
    return {'image': images, 'label': pixels['label'], 'mask': mask}
