"""Data: sources of labelled images in, deterministic sharded batches out. Knows no model.

  source = get_source('fashion_mnist', data_dir=None, split='train')
  batches = train_iterator(source, image_size=28, channels=1, global_batch_size=128, seed=0,
                           augment='pad_crop_flip', num_classes=source.num_classes)
  batch = next(batches)        # {'image': f32 [128, 28, 28, 1] in [-1, 1], 'labels': f32 [128, 10]}
  state = batches.get_state()  # {'step': 1, ...}, JSON; set_state(state) continues from there
  for batch in eval_batches(get_source('fashion_mnist', split='test'), image_size=28, channels=1,
                            global_batch_size=512):
    ...                        # {'image', 'label': int32, 'mask': bool}: every example once

Modules: sources*.py (what the examples are), imageio.py (decoding), augment.py and preprocess.py
(what is done to them), batches.py (which examples and random numbers batch s holds), loader.py
(workers, prefetching, sharding, state).
"""
from vit_jax.data.augment import DEFAULTS, PRESETS, augment_config
from vit_jax.data.imageio import IMAGE_EXTENSIONS, BadImageError
from vit_jax.data.loader import (EvalIterator, TrainIterator, eval_batches, num_eval_batches,
                                 train_iterator)
from vit_jax.data.sources import ArraySource, Source, dataset_info, get_source

__all__ = [
    'ArraySource', 'BadImageError', 'DEFAULTS', 'EvalIterator', 'IMAGE_EXTENSIONS', 'PRESETS',
    'Source', 'TrainIterator', 'augment_config', 'dataset_info', 'eval_batches', 'get_source',
    'num_eval_batches', 'train_iterator',
]
