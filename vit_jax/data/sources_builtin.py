"""Real data that needs no network: Fashion-MNIST from Debian's idx files, scikit-learn's digits."""
from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from vit_jax.data.sources import ArraySource, held_out_indices, select_split

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot']
_FASHION_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def read_idx(path: str) -> np.ndarray:
  """An idx file (LeCun's MNIST format, optionally gzipped) as a NumPy array of its shape."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an idx file (bad magic number)')
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
  dtype, ndim = np.dtype(dtypes[data[2]]), data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim))
  arr = np.frombuffer(data, dtype, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: header says {shape}, found {arr.size} values')
  return arr.reshape(shape).astype(dtype.newbyteorder('='))


@functools.lru_cache(maxsize=4)
def _fashion_arrays(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  out = {}
  for split, (images, labels) in _FASHION_FILES.items():
    paths = [os.path.join(data_dir, f) for f in (images, labels)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(
          f'Fashion-MNIST is not in {data_dir} (missing {", ".join(missing)}). Install it with '
          f'`sudo apt-get install dataset-fashion-mnist`, or put the four idx .gz files in a folder '
          f'and pass it as data_dir (--config.data_dir=/path).')
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3 or len(x) != len(y):
      raise ValueError(f'{paths[0]}: expected [N, 28, 28] images matching {len(y)} labels, '
                       f'got {x.shape}')
    x.setflags(write=False)
    out[split] = (x, y.astype(np.int64))
  return out


def fashion_mnist(data_dir: str | None, split: str) -> ArraySource:
  """Fashion-MNIST (Xiao et al., 2017): 28x28x1 uint8, 10 classes, 60,000 train / 10,000 test.

  Its train split is stored in random order, so `train[:90%]` / `train[90%:]` are fair halves.
  """
  data_dir = os.path.expanduser(data_dir or FASHION_MNIST_DIR)
  arrays = _fashion_arrays(data_dir)
  n_train, n_test = len(arrays['train'][1]), len(arrays['test'][1])
  # One index space over train then test, so a split is one index array.
  idx = select_split(split, {'train': np.arange(n_train), 'test': n_train + np.arange(n_test)},
                     f'fashion_mnist ({data_dir})')
  # Splits never mix train and test, so each is a selection from one of the two arrays.
  part, offset = ('test', n_train) if idx.size and idx.min() >= n_train else ('train', 0)
  x, y = arrays[part]
  sel = idx - offset
  name = f'fashion_mnist:{split}'
  if len(sel) == len(y) and (sel == np.arange(len(y))).all():
    return ArraySource(x, y, FASHION_MNIST_CLASSES, name=name)  # a view: no 47 MB copy per call
  return ArraySource(x[sel], y[sel], FASHION_MNIST_CLASSES, name=name)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  d = load_digits()
  # Values are 0..16 (counts of set pixels in 4x4 blocks); spread them over 0..255.
  images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


def digits(split: str, held_out: float = 0.2, seed: int = 0) -> ArraySource:
  """scikit-learn's handwritten digits: 1,797 images of 8x8x1, 10 classes.

  The data has no official test split: a fixed random `held_out` fraction (by `seed`) is `test`
  (also answered to `validation`), the rest is `train`.
  """
  images, labels = _digits_arrays()
  if not held_out:
    raise ValueError('digits has no test split of its own: give held_out > 0 (default 0.2)')
  kept, held = held_out_indices(len(labels), held_out, seed)
  idx = select_split(split, {'train': kept, 'test': held, 'validation': held}, 'digits')
  return ArraySource(images[idx], labels[idx], [str(k) for k in range(10)], name=f'digits:{split}')
