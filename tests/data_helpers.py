"""Tiny image folders for the data tests: a few dozen small files, written in milliseconds."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_image(path: str, rng: np.random.Generator, size=(30, 40), mode: str = 'RGB') -> str:
  """A small random image (h, w = size) in `mode`, saved in the format its extension names."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  h, w = size
  arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(arr)
  if mode == 'P':
    img = img.convert('P', palette=Image.ADAPTIVE, colors=16)
  elif mode != 'RGB':
    img = img.convert(mode)
  img.save(path)
  return path


def make_folder(root: str, classes=('cat', 'dog', 'fox'), per_class: int = 6,
                splits=('train', 'test'), seed: int = 0, size=(30, 40)) -> str:
  """root/<split>/<class>/<k>.{jpg,png,...}: mixed formats and modes, `per_class` each."""
  rng = np.random.default_rng(seed)
  kinds = [('jpg', 'RGB'), ('png', 'RGBA'), ('jpeg', 'L'), ('bmp', 'RGB'), ('png', 'P'),
           ('webp', 'RGB')]
  for split in splits:
    for c in classes:
      for k in range(per_class):
        ext, mode = kinds[k % len(kinds)]
        parts = [root] + ([split] if split else []) + [c, f'{k:03d}.{ext}']
        write_image(os.path.join(*parts), rng, size, mode)
  return root


def add_bad_files(folder: str) -> list[str]:
  """A truncated JPEG and a text file named .png in `folder`; returns their paths."""
  rng = np.random.default_rng(1)
  good = write_image(os.path.join(folder, 'zz_truncated.jpg'), rng, (64, 64))
  with open(good, 'rb') as f:
    data = f.read()
  with open(good, 'wb') as f:
    f.write(data[: len(data) // 2])
  text = os.path.join(folder, 'zz_notes.png')
  with open(text, 'w') as f:
    f.write('this is not an image\n')
  return [good, text]
