"""A folder of images, one sub-folder per class (class names are the sorted folder names), or a
folder of unlabelled images.

Layouts:
  root/{train,validation,test}/<class>/*.jpg    split folders (`val` is read as `validation`)
  root/<class>/*.jpg                            no split folders
  root/*.jpg, root/{train,...}/*.jpg            unlabelled: no class folders, the images directly
                                                (`num_classes` 0; for objectives that learn from
                                                the images alone, such as mpp and mae)
Where there is nothing but train, a fixed random fraction of it (`held_out`, default 10%) is
`test` (also answered to `validation`) and leaves `train`; `held_out=0` trains on everything.
Files are read lazily, as encoded bytes; decoding (and skipping corrupt files) is the loader's job.

Hostile folders:
  class names   the folder names in Unicode NFC (a name typed on Linux matches one written by macOS
                in NFD), sorted by code point; spaces and any script are fine. Labels follow the
                names of the train split's classes, so every split labels a class alike; a class
                in another split that train lacks is an error naming it.
  empty class   in train (the split that defines the classes): an error naming the folder; in
                validation/test: a warning, the class keeps its label and has no examples there.
  hidden        files and folders whose names start with '.' are ignored.
  symlinks      followed only where they resolve inside the dataset root (`realpath(root)`; the
                root itself may be a link): a link that points outside is skipped with a warning
                naming it and listed in `FolderSource.skipped_links`, as is a dangling link or a
                loop of links; a link back up the tree is walked once.
"""
from __future__ import annotations

import logging
import os
from typing import Any
import unicodedata

import numpy as np

from vit_jax.data.imageio import IMAGE_EXTENSIONS, BadImageError
from vit_jax.data.sources import Source, held_out_indices, select_split

SPLIT_DIRS = {'train': 'train', 'validation': 'validation', 'val': 'validation', 'test': 'test'}
_EXTS = ', '.join(IMAGE_EXTENSIONS)
log = logging.getLogger(__name__)


class FolderSource(Source):
  """Image files with integer labels (unlabelled: no class names, `num_classes` 0, labels 0);
  `source[i]['image']` is the file's bytes."""

  def __init__(self, files: list[str], labels: np.ndarray, class_names: list[str], name: str,
               skipped_links: list[str] | None = None):
    self.files, self.labels = files, np.asarray(labels, np.int64)
    self.class_names, self.num_classes = (class_names or None), len(class_names or [])
    self.name = name
    self.skipped_links = list(skipped_links or [])  # links left out: outside root, dangling, loops

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


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # a loop of links: not a folder (the link is then judged by `keep`)
    return False


class _Walker:
  """Lists class folders and image files under a dataset root, following symlinks only where they
  resolve inside it (see the module docstring); remembers the links it left out."""

  def __init__(self, root: str):
    self.root = os.path.realpath(root)
    self.skipped_links: list[str] = []

  def keep(self, path: str) -> bool:
    if not os.path.islink(path):
      return True
    try:
      target = os.path.realpath(path, strict=True)
      where = f'it points to {target}, outside the dataset root {self.root}'
    except OSError as e:  # dangling, or a loop of links
      target, where = '', f'it cannot be resolved ({e.strerror})'
    if target == self.root or target.startswith(self.root.rstrip(os.sep) + os.sep):
      return True
    if path not in self.skipped_links:
      self.skipped_links.append(path)
      log.warning('skipped symlink %s: %s', path, where)
    return False

  def dirs(self, folder: str) -> list[os.DirEntry]:
    return [e for e in os.scandir(folder)
            if not e.name.startswith('.') and _is_dir(e) and self.keep(e.path)]

  def class_dirs(self, folder: str) -> dict[str, str]:
    """{class name (NFC): its folder}, sorted by name."""
    out: dict[str, str] = {}
    for e in self.dirs(folder):
      name = unicodedata.normalize('NFC', e.name)
      if name in out:
        raise ValueError(f'{out[name]} and {e.path} are the same class name in different Unicode '
                         f'forms; merge them into one folder')
      out[name] = e.path
    return dict(sorted(out.items()))

  def images(self, folder: str) -> list[str]:
    """Image files under `folder` (recursively, so `class/subdir/*.jpg` counts), sorted."""
    out, seen = [], set()

    def walk(d: str) -> None:
      real = os.path.realpath(d)
      if real in seen:  # a link back up the tree: each folder once
        return
      seen.add(real)
      entries = sorted((e for e in os.scandir(d) if not e.name.startswith('.')),
                       key=lambda e: e.name)
      subdirs = [e for e in entries if _is_dir(e)]  # os.walk's order: this folder's files first
      out.extend(e.path for e in entries if not _is_dir(e)
                 and e.name.lower().endswith(IMAGE_EXTENSIONS) and self.keep(e.path))
      for e in subdirs:
        if self.keep(e.path):
          walk(e.path)

    walk(folder)
    return out


def _scan(walker: _Walker, folder: str, class_names: list[str] | None,
          root: str) -> tuple[list[str], list[int], list[str]]:
  """(files, labels, class_names) of one split folder; `class_names` given: must be a superset."""
  found = walker.class_dirs(folder)
  if not found:
    loose = walker.images(folder)
    if loose and not class_names:  # unlabelled images (every split alike)
      return loose, [0] * len(loose), []
    hint = (f' (it holds {len(loose)} images directly: a labelled split must have one folder per '
            'class)' if loose else '')
    raise FileNotFoundError(f'{folder} has no class folders{hint}. Expected {root}/<class>/*.jpg, '
                            f'{root}/train/<class>/*.jpg, or unlabelled {root}/*.jpg, with {_EXTS} '
                            'files.')
  if class_names == []:
    raise ValueError(f'{folder} has class folders, but the train split of {root} is unlabelled '
                     '(images directly): label every split or none')
  defines = class_names is None
  if defines:
    class_names = list(found)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f'{folder} has classes {unknown} that the train split does not have; '
                     f'add them to {root}/train or remove them.')
  index = {c: k for k, c in enumerate(class_names)}
  files, labels = [], []
  for c, path in found.items():
    images = walker.images(path)
    if not images and defines:
      raise FileNotFoundError(f'class folder {path} has no images ({_EXTS}); add images or remove '
                              f'the folder.')
    if not images:
      log.warning('class folder %s has no images: class %r has no examples in this split', path, c)
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
  walker = _Walker(root)
  split_dirs = {SPLIT_DIRS[e.name]: e.path for e in walker.dirs(root) if e.name in SPLIT_DIRS}
  where = f'image folder {root}'
  if not split_dirs:  # root/<class>/*
    files, labels, classes = _scan(walker, root, None, root)
    parts = {'train': np.arange(len(files))}
  else:
    first = split_dirs.get('train') or next(iter(sorted(split_dirs.values())))
    classes = _scan(walker, first, None, root)[2]
    files, labels, parts = [], [], {}
    for name in ('train', 'validation', 'test'):
      if name in split_dirs:
        f, l, _ = _scan(walker, split_dirs[name], classes, root)
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
                      f'{root}:{split}', walker.skipped_links)
