"""timm checkpoint directories: `config.json` (timm's Hub format: `architecture`, `model_args`,
`pretrained_cfg`, as `timm.models.push_to_hf_hub.save_for_hf` writes it) + `model.safetensors`.

Which family reads a directory is settled by `registry.interop_for_timm(architecture, keys)`; that
family's interop (`vit_jax.families.interop.Interop`) maps the keys. Writing needs only numpy and
safetensors.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import registry
from vit_jax.families.base import Architecture, Flat
from vit_jax.formats.files import (check_declared, load_safetensors, read_json,
                                   safetensors_keys)

WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
# `model_args` a config.json may declare that its weights decide: checked against them on reading.
DECLARED_SIZES = ('embed_dim', 'embed_dims', 'depth', 'depths', 'num_heads', 'patch_size',
                  'in_chans', 'num_classes', 'img_size', 'mlp_ratio', 'mlp_ratios', 'window_size',
                  'num_blocks')


def _keys(path: str) -> list[str]:
  return safetensors_keys(path)  # a damaged file: a ValueError naming it


def weights_path(path: str) -> str:
  return os.path.join(path, WEIGHTS) if os.path.isdir(path) else path


def load_config(path: str) -> dict[str, Any]:
  cfg = os.path.join(os.path.dirname(weights_path(path)), CONFIG)
  if not os.path.exists(cfg):
    return {}
  return read_json(cfg)



def is_timm(path: str) -> bool:
  """A `.safetensors` file (or a directory with model.safetensors) whose keys a family reads.

  A damaged file or config.json is a ValueError naming it (it is a timm file, just not readable).
  """
  weights = weights_path(path)
  if not (weights.endswith('.safetensors') and os.path.isfile(weights)):
    return False
  config = load_config(path)
  if config.get('model_type'):  # A Hugging Face directory.
    return False
  keys = _keys(weights)
  try:
    registry.interop_for_timm(config.get('architecture', ''), keys)
  except ValueError:
    return False
  return True


def read_timm(path: str | os.PathLike, *, model_config: Optional[Mapping[str, Any]] = None
              ) -> tuple[Flat, Architecture, dict[str, Any]]:
  """(flat params, architecture, info with 'class_names' and 'notes') of a timm file or directory.

  model_config: registry fields to fill what a bare file cannot say (e.g. num_heads without a
  config.json); the file's own config wins.
  """
  path = os.fspath(path)
  weights = weights_path(path)
  config = load_config(path)
  state = load_safetensors(weights)
  interop = registry.interop_for_timm(config.get('architecture', ''), state.keys())
  if model_config and not config.get('model_args'):
    config = {**config, 'model_args': {'num_heads': model_config.get('num_heads')}}
  try:
    flat, arch, notes = interop.from_timm(state, config)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: cannot read it as a timm {interop.name} checkpoint: {e}') from e
  names = config.get('label_names') or (config.get('pretrained_cfg') or {}).get('label_names')
  _check_config(path, config, flat, arch, names)
  return flat, arch, {'class_names': names, 'notes': notes}


def _check_config(path: str, config: Mapping[str, Any], flat: Flat, arch: Architecture,
                  names: Optional[Sequence[str]]) -> None:
  """config.json's sizes, class count and label names against the weights (ValueError naming it)."""
  cfg_path = os.path.join(os.path.dirname(weights_path(path)), CONFIG)
  declared = {**(config.get('model_args') or {})}
  if 'num_classes' in config:
    declared.setdefault('num_classes', config['num_classes'])
  try:
    implied = registry.interop(arch.family).to_timm(dict(flat), arch)[1].get('model_args', {})
  except ValueError:  # not writable back: compare what the architecture itself says
    implied = {}
  implied = {'num_classes': arch.num_classes or 0, 'in_chans': arch.channels, **implied}
  check_declared(cfg_path, declared, implied, DECLARED_SIZES)
  if names and len(names) != (arch.num_classes or 0):
    raise ValueError(f'{cfg_path} has {len(names)} label_names, but the weights\' head predicts '
                     f'{arch.num_classes or 0} classes')


def write_timm(out_dir: str | os.PathLike, flat: Mapping[str, np.ndarray], arch: Architecture,
               class_names: Optional[Sequence[str]] = None) -> str:
  """Writes `model.safetensors` and `config.json` into out_dir; returns the weights' path."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state, config = registry.interop(arch.family).to_timm(dict(flat), arch)
  config['vit_jax'] = arch.to_meta()  # Ours (timm ignores it): a round trip keeps the name.
  if class_names:
    config['label_names'] = list(class_names)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, WEIGHTS)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path)
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  return path
