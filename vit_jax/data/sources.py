"""Random-access sources of labelled images, and `get_source`, which picks one by name.

A source is a sequence: `len(source)` examples, `source[i]` a dict with `image` (uint8 [H, W, C]
array, or the encoded bytes of a file), `label` (int) and `name` (a file path or record id, used in
error messages). It also knows `num_classes` and `class_names` (None when the data has no names).
Sources never shuffle, augment or batch; the loader does that from indices alone, which is what
makes batches reproducible and the pipeline state a single step counter.

Names understood by `get_source`:
  `fashion_mnist`, `digits`       built-in real data, no network (`sources_builtin.py`)
  a folder path / `folder:<path>`  `root/{train,validation,test}/<class>/*` or `root/<class>/*`
  anything else / `tfds:<name>`    a TFDS dataset prepared in `data_dir` (`sources_tfds.py`)
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np


class Source:
  """Base class: random access to `(image, label)` examples. See the module docstring."""
  name: str = 'source'
  num_classes: int = 0
  class_names: list[str] | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r}, {len(self)} examples, {self.num_classes} classes)'


class ArraySource(Source):
  """Images held in memory: uint8 [N, H, W, C] (or [N, H, W], read as C = 1) and integer labels [N].

  The loader recognises this class and augments whole batches with vectorised NumPy instead of one
  image at a time, which is what keeps small-image training (Fashion-MNIST, digits) cheap.
  """

  def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
               class_names: Sequence[str] | None = None, num_classes: int | None = None,
               name: str = 'arrays'):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f'ArraySource needs uint8 images [N, H, W, C], got {images.dtype} '
                       f'{images.shape}; convert floats with (x * 255).round().astype(np.uint8)')
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'ArraySource needs integer labels [{images.shape[0]}], got {labels.dtype} '
                       f'{labels.shape}')
    if len(labels) == 0:
      raise ValueError(f'ArraySource {name!r} has no examples')
    self.images, self.labels = images, labels.astype(np.int64)
    self.class_names = list(class_names) if class_names is not None else None
    if num_classes is None:
      num_classes = len(self.class_names) if self.class_names else int(labels.max()) + 1
    self.num_classes = int(num_classes)
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f'labels of {name!r} must lie in [0, {self.num_classes}), '
                       f'got [{labels.min()}, {labels.max()}]')
    self.name = name

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self.images[index], 'label': int(self.labels[index]),
            'name': f'{self.name}[{index}]'}

  def subset(self, indices: np.ndarray, name: str | None = None) -> ArraySource:
    return ArraySource(self.images[indices], self.labels[indices], self.class_names,
                       self.num_classes, name or self.name)


# ------------------------------------------------------------------------------ split strings

_SPLIT_RE = re.compile(r'^\s*([A-Za-z_]+)\s*(?:\[\s*([-+]?\d*%?)\s*:\s*([-+]?\d*%?)\s*\])?\s*$')


def parse_split(split: str) -> tuple[str, tuple[str, str] | None]:
  """'train[:98%]' -> ('train', ('', '98%')); 'test' -> ('test', None). TFDS's slicing syntax."""
  m = _SPLIT_RE.match(split)
  if not m:
    raise ValueError(f'cannot parse split {split!r}; expected e.g. train, test, train[:98%], '
                     f'train[1000:]')
  base = m.group(1)
  bounds = None if m.group(2) is None else (m.group(2), m.group(3))
  return base, bounds


def slice_indices(n: int, bounds: tuple[str, str] | None) -> np.ndarray:
  """Indices [0, n) selected by TFDS-style bounds; percentages round to the nearest example."""
  if bounds is None:
    return np.arange(n)

  def pos(v: str, default: int) -> int:
    if not v:
      return default
    k = round(float(v[:-1]) * n / 100) if v.endswith('%') else int(v)
    return max(0, min(n, k + n if k < 0 else k))

  return np.arange(pos(bounds[0], 0), pos(bounds[1], n))


def held_out_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out) index arrays: a fixed random `fraction` of [0, n) held out, both sorted."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'held_out must be a fraction in (0, 1), got {fraction}')
  perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
  k = max(1, int(round(n * fraction)))
  return np.sort(perm[k:]), np.sort(perm[:k])


def select_split(split: str, splits: dict[str, np.ndarray], where: str,
                 shuffle_seed: int | None = None) -> np.ndarray:
  """Indices of `split` (e.g. `train`, `test`, `train[90%:]`) for data whose splits are index arrays.

  `splits` maps the split names the data has to indices. A slice applies to the named split in its
  stored order, or, with `shuffle_seed`, in a fixed random order (for data stored sorted by class,
  such as a folder, where `train[90%:]` would otherwise be the last classes only).
  """
  base, bounds = parse_split(split)
  base = {'val': 'validation', 'eval': 'test'}.get(base, base)
  idx = splits.get(base)
  if idx is None:
    have = sorted(splits)
    raise ValueError(
        f'{where} has no {base!r} split (it has: {", ".join(have)}). Ask for one of those, or carve '
        f'one out of train with split strings: train_split="train[:90%]", '
        f'eval_split="train[90%:]".')
  if bounds is not None and shuffle_seed is not None:
    idx = idx[np.random.default_rng([shuffle_seed, 0x511CE]).permutation(len(idx))]
  return idx[slice_indices(len(idx), bounds)]


# --------------------------------------------------------------------------------- dispatch

def _folder_path(name: str) -> str | None:
  """The folder `name` refers to, or None when it is a dataset name.

  An existing directory wins over a TFDS name; a path starting with `/`, `.` or `~` is always a
  folder (so a typo in it gets the folder's "does not exist" error, not TFDS's).
  """
  if name.startswith('folder:'):
    return os.path.expanduser(name[len('folder:'):])
  path = os.path.expanduser(name)
  if os.path.isdir(path) or name.startswith(('/', '.', '~')):
    return path
  return None


def get_source(name: str, *, data_dir: str | None = None, split: str = 'train',
               held_out: float | None = None, seed: int = 0) -> Source:
  """The examples of dataset `name`'s `split`.

  Args:
    name: `fashion_mnist`, `digits`, a folder path (or `folder:<path>`), or a TFDS name
      (`cifar10`, `imagenet2012`, ...; `tfds:<name>` forces TFDS, e.g. `tfds:fashion_mnist`).
    data_dir: where the data lives: the Fashion-MNIST idx folder, or TFDS's data_dir (local or
      cloud). None: the source's default.
    split: `train`, `test`, `validation` where the data has it, optionally sliced TFDS-style:
      `train[:90%]` / `train[90%:]` carve an evaluation split out of train.
    held_out: for data without a split of its own to evaluate on (a folder `root/<class>/*` or one
      with only `train/`, and digits): the fraction of it that is `test` (= `validation`), the rest
      being `train`. None: 10% for folders, 20% for digits. Ignored where the data has a test split.
    seed: fixes which examples are held out, and the order `train[a:b]` slices a folder in
      (not the training order).
  """
  from vit_jax.data import sources_builtin, sources_folder, sources_tfds  # circular at import time
  if name == 'fashion_mnist':
    return sources_builtin.fashion_mnist(data_dir, split)
  if name == 'digits':
    return sources_builtin.digits(split, 0.2 if held_out is None else held_out, seed)
  if name.startswith('tfds:'):
    return sources_tfds.TfdsSource(name[len('tfds:'):], split=split, data_dir=data_dir)
  folder = _folder_path(name)
  if folder is not None:
    return sources_folder.folder_source(folder, split, held_out, seed)
  return sources_tfds.TfdsSource(name, split=split, data_dir=data_dir)


def dataset_info(name: str, data_dir: str | None = None) -> tuple[int, list[str] | None]:
  """(num_classes, class_names) of a dataset, read from its train split; names may be None."""
  source = get_source(name, data_dir=data_dir, split='train')
  return source.num_classes, source.class_names
