"""A folder of images, one sub-folder per class; class names are the sorted folder names.

Two layouts:
  root/{train,validation,test}/<class>/*.jpg    split folders (`val` is read as `validation`)
  root/<class>/*.jpg                            no split folders
Where there is nothing but train, a fixed random fraction of it (`held_out`, default 10%) is
`test` (also answered to `validation`) and leaves `train`; `held_out=0` trains on everything.
Files are read lazily, as encoded bytes; decoding (and skipping corrupt files) is the loader's job.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from vit_jax.data.imageio import IMAGE_EXTENSIONS, BadImageError
from vit_jax.data.sources import Source, held_out_indices, select_split

SPLIT_DIRS = {'train': 'train', 'validation': 'validation', 'val': 'validation', 'test': 'test'}
_EXTS = ', '.join(IMAGE_EXTENSIONS)


class FolderSource(Source):
  """Image files with integer labels; `source[i]['image']` is the file's bytes."""

  def __init__(self, files: list[str], labels: np.ndarray, class_names: list[str], name: str):
    self.files, self.labels = files, np.asarray(labels, np.int64)
    self.class_names, self.num_classes, self.name = class_names, len(class_names), name

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.files[index]
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:  # vanished, unreadable: skipped like a corrupt file
      raise BadImageError(path, e) from e
    return {'image': data, 'label': int(self.labels[index]), 'name': path}


def _class_dirs(folder: str) -> list[str]:
  return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def _images_in(folder: str) -> list[str]:
  """Image files under `folder` (recursively, so `class/subdir/*.jpg` counts), sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
               if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS))
  return out


def _scan(folder: str, class_names: list[str] | None,
          root: str) -> tuple[list[str], list[int], list[str]]:
  """(files, labels, class_names) of one split folder; `class_names` given: must be a superset."""
  found = _class_dirs(folder)
  if not found:
    loose = _images_in(folder)
    hint = (f' (it holds {len(loose)} images directly; move them into one folder per class)'
            if loose else '')
    raise FileNotFoundError(f'{folder} has no class folders{hint}. Expected {root}/<class>/*.jpg '
                            f'or {root}/train/<class>/*.jpg with {_EXTS} files.')
  if class_names is None:
    class_names = found
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f'{folder} has classes {unknown} that the train split does not have; '
                     f'add them to {root}/train or remove them.')
  index = {c: k for k, c in enumerate(class_names)}
  files, labels = [], []
  for c in found:
    images = _images_in(os.path.join(folder, c))
    if not images:
      raise FileNotFoundError(f'class folder {os.path.join(folder, c)} has no images ({_EXTS}); '
                              f'add images or remove the folder.')
    files.extend(images)
    labels.extend([index[c]] * len(images))
  return files, labels, class_names


def folder_source(root: str, split: str, held_out: float | None = None,
                  seed: int = 0) -> FolderSource:
  """The `split` of the image folder `root` (see the module docstring for the layouts)."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root} does not exist. Point the dataset at a folder '
                            f'laid out as root/<class>/*.jpg or root/train/<class>/*.jpg.')
  split_dirs = {SPLIT_DIRS[e.name]: e.path for e in os.scandir(root)
                if e.is_dir() and e.name in SPLIT_DIRS}
  where = f'image folder {root}'
  if not split_dirs:  # root/<class>/*
    files, labels, classes = _scan(root, None, root)
    parts = {'train': np.arange(len(files))}
  else:
    first = split_dirs.get('train') or next(iter(sorted(split_dirs.values())))
    classes = _scan(first, None, root)[2]
    files, labels, parts = [], [], {}
    for name in ('train', 'validation', 'test'):
      if name in split_dirs:
        f, l, _ = _scan(split_dirs[name], classes, root)
        parts[name] = len(files) + np.arange(len(f))
        files, labels = files + f, labels + l
  if set(parts) == {'train'}:
    # Nothing to evaluate on of its own: hold out a fixed random fraction of train.
    fraction = 0.1 if held_out is None else held_out
    if fraction:
      kept, held = held_out_indices(len(parts['train']), fraction, seed)
      parts = {'train': parts['train'][kept], 'test': parts['train'][held],
               'validation': parts['train'][held]}
  idx = select_split(split, parts, where, shuffle_seed=seed)
  if len(idx) == 0:
    raise ValueError(f'split {split!r} of {where} is empty')
  return FolderSource([files[i] for i in idx], np.asarray(labels)[idx], classes,
                      f'{root}:{split}')
