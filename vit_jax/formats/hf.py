"""Hugging Face model directories: `config.json` (`model_type`, sizes, id2label) + `model.safetensors`
(or sharded with an index) + `preprocessor_config.json`.

The family that reads a `model_type` is `registry.interop_for_hf`; its interop maps the keys.
Writing needs only numpy and safetensors; only safetensors weights are read (no pickle).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import registry
from vit_jax.families.base import Architecture, Flat
from vit_jax.formats.files import check_declared, load_safetensors, read_json

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
# Sizes a config.json declares that its weights decide: checked against them on reading.
DECLARED_SIZES = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                  'image_size', 'patch_size', 'num_channels', 'embed_dim', 'depths', 'num_heads',
                  'window_size', 'hidden_sizes')


def _config(path: str) -> dict[str, Any]:
  return read_json(os.path.join(path, CONFIG))


def is_hf_dir(path: str) -> bool:
  """A directory with config.json naming a registered `model_type`. A damaged config.json next to
  safetensors weights is a ValueError naming it; elsewhere (a run's workdir) it is not HF's."""
  if not (os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG))):
    return False
  try:
    config = _config(path)
  except ValueError:
    if any(os.path.exists(os.path.join(path, f)) for f in (WEIGHTS, INDEX)):
      raise
    return False
  model_type = config.get('model_type')
  if not model_type:
    return False
  try:
    registry.interop_for_hf(model_type)
  except ValueError:
    return False
  return True


def load_weights(directory: str) -> Flat:
  single = os.path.join(directory, WEIGHTS)
  if os.path.exists(single):
    return load_safetensors(single)
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    weight_map = read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index} has no "weight_map" object naming the shard of each tensor')
    state: Flat = {}
    for shard in sorted(set(weight_map.values())):
      state.update(load_safetensors(os.path.join(directory, shard)))
    return state
  raise FileNotFoundError(
      f'{directory}: no {WEIGHTS} or {INDEX} (only safetensors weights are read; re-save a '
      'pytorch_model.bin with `save_pretrained(safe_serialization=True)`)')


def read_hf(path: str | os.PathLike) -> tuple[Flat, Architecture, dict[str, Any]]:
  """(flat params, architecture, info with 'class_names' and 'notes') of a Hugging Face directory.

  The input normalisation comes from preprocessor_config.json when present.
  """
  path = os.fspath(path)
  config = _config(path)
  interop = registry.interop_for_hf(config.get('model_type', ''))
  try:
    flat, arch, notes = interop.from_hf(load_weights(path), config)
  except (KeyError, TypeError) as e:
    raise ValueError(f'{path}: cannot read it as a Hugging Face {interop.name} checkpoint: '
                     f'{type(e).__name__}: {e}') from e
  except ValueError as e:
    raise ValueError(f'{path}: {e}' if path not in str(e) else str(e)) from e
  _check_config(path, config, flat, arch)
  pre = os.path.join(path, PREPROCESSOR)
  if os.path.exists(pre):
    pcfg = read_json(pre)
    if pcfg.get('do_normalize', True) and pcfg.get('image_mean') and pcfg.get('image_std'):
      arch.mean, arch.std = tuple(pcfg['image_mean']), tuple(pcfg['image_std'])
  id2label = config.get('id2label') or {}
  try:
    names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
  except KeyError as e:
    raise ValueError(f'{os.path.join(path, CONFIG)}: id2label must number the classes 0..'
                     f'{len(id2label) - 1}; it lacks {e}') from e
  if names and all(re.fullmatch(r'LABEL_\d+', n) for n in names):
    names = None  # transformers' placeholders carry no information.
  return flat, arch, {'class_names': names, 'notes': notes}


def _check_config(path: str, config: Mapping[str, Any], flat: Flat, arch: Architecture) -> None:
  """config.json's sizes, channels and labels against the weights (ValueError naming it)."""
  cfg_path = os.path.join(path, CONFIG)
  family = arch.get_family()
  if family.stem_kernel in flat and flat[family.stem_kernel].shape[2] != arch.channels:
    raise ValueError(f'{cfg_path} says num_channels={arch.channels}, but the weights\' input '
                     f'convolution takes {flat[family.stem_kernel].shape[2]} channels')
  try:
    implied = registry.interop(family).to_hf(dict(flat), arch)[1]
  except ValueError:  # not writable back: the sizes were read off the weights alone
    implied = {}
  check_declared(cfg_path, config, implied, DECLARED_SIZES)
  labels = config.get('id2label') or {}
  if arch.num_classes and labels and len(labels) != arch.num_classes:
    raise ValueError(f'{cfg_path} names {len(labels)} classes in id2label, but the weights\' head '
                     f'predicts {arch.num_classes}')


def preprocessor_config(arch: Architecture) -> dict[str, Any]:
  """Image-processor settings that feed the model as trained: resize, /255, (x - mean) / std."""
  h, w = arch.image_size
  return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
          'size': {'height': h, 'width': w}, 'resample': 2, 'do_rescale': True,
          'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': list(arch.mean),
          'image_std': list(arch.std)}


def write_hf(out_dir: str | os.PathLike, flat: Mapping[str, np.ndarray], arch: Architecture,
             class_names: Optional[Sequence[str]] = None) -> str:
  """Writes config.json, model.safetensors and preprocessor_config.json; returns out_dir."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state, config = registry.interop(arch.family).to_hf(dict(flat), arch)
  n = arch.num_classes or 0
  if class_names is not None and len(class_names) != n:
    raise ValueError(f'{len(class_names)} class names for a head of {n} classes')
  labels = list(class_names) if class_names is not None else [f'LABEL_{i}' for i in range(n)]
  config['id2label'] = {str(i): name for i, name in enumerate(labels)}
  config['label2id'] = {name: i for i, name in enumerate(labels)}
  config['vit_jax'] = arch.to_meta()  # Ours (HF ignores it): a round trip keeps the name.
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
            os.path.join(out_dir, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, PREPROCESSOR), 'w') as f:
    json.dump(preprocessor_config(arch), f, indent=2)
  return os.fspath(out_dir)
