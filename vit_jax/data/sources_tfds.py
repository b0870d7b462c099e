"""TFDS datasets read through `tfds.data_source`: random access to ArrayRecord files, no TensorFlow.

Nothing downloads at run time, and reading needs no TensorFlow. Prepare a dataset once, on a
machine with internet and `pip install tensorflow tensorflow-datasets` (building, unlike reading,
uses TensorFlow), in ArrayRecord format (random access is what makes the loader's order and state
deterministic):

  tfds build cifar10 --data_dir=gs://my-bucket/tfds --file_format=array_record

A dataset already prepared as TFRecord is converted in place with

  tfds convert_format --root_data_dir=/data/tfds --out_file_format=array_record

(ImageNet's `imagenet2012` needs its archives placed in `<data_dir>/downloads/manual` first.)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vit_jax.data.sources import Source


class TfdsSource(Source):
  """One TFDS split (`train`, `test`, `train[:98%]`, ...) of dataset `name` prepared in `data_dir`.

  `source[i]['image']` is the decoded uint8 [H, W, C] array TFDS returns.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None,
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds  # heavy: only when a TFDS dataset is asked for
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    where = data_dir or '~/tensorflow_datasets'
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends; their message lists every dataset
      lines = str(e).splitlines()
      hint = ' '.join(lines[:1] + [l for l in lines if l.startswith('Did you mean')])
      raise ValueError(f'{name!r} is neither a built-in dataset (fashion_mnist, digits), an '
                       f'existing image folder, nor a TFDS dataset: {hint}') from e
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
      if not builder.is_prepared():
        raise FileNotFoundError(
            f'TFDS dataset {name!r} is not prepared in {where}. On a machine with internet and '
            f'TensorFlow run '
            f'`tfds build {name} --data_dir={where} --file_format=array_record` and copy the '
            f'folder there (or pass the right --config.data_dir).') from e
      raise ValueError(
          f'cannot open split {split!r} of TFDS dataset {name!r} in {where}: {e}. Splits there: '
          f'{sorted(builder.info.splits)}. If it was prepared as TFRecord, convert it with '
          f'`tfds convert_format --root_data_dir={where} --out_file_format=array_record`.') from e
    features = builder.info.features
    if image_key not in features or label_key not in features:
      raise ValueError(f'TFDS {name!r} has features {sorted(features)}; this loader reads '
                       f'{image_key!r} and {label_key!r}')
    label = features[label_key]
    self.num_classes = int(label.num_classes)
    names = list(getattr(label, 'names', None) or [])
    self.class_names = names or None
    if len(self._ds) == 0:
      raise ValueError(f'split {split!r} of TFDS dataset {name!r} in {where} is empty')

  def __getstate__(self):
    # Worker processes reopen the ArrayRecord files themselves rather than receive open readers.
    return {k: v for k, v in self.__dict__.items() if k != '_ds'}

  def __setstate__(self, state):
    import tensorflow_datasets as tfds
    self.__dict__.update(state)
    self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._ds[int(index)]
    return {'image': np.asarray(ex[self.image_key]), 'label': int(ex[self.label_key]),
            'name': f'{self.name}/{self.split}[{index}]'}
