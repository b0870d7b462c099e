"""timm checkpoint directories: `config.json` (timm's Hub format: `architecture`, `model_args`,
`pretrained_cfg`, as `timm.models.push_to_hf_hub.save_for_hf` writes it) + `model.safetensors`.

Which family reads a directory is settled by `registry.family_for_timm(architecture, keys)`; the
family's descriptor maps the keys. Writing needs only numpy and safetensors.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.families import registry
from vit_jax.families.base import Architecture, Flat

WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'


def _keys(path: str) -> list[str]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework='numpy') as f:
    return list(f.keys())


def weights_path(path: str) -> str:
  return os.path.join(path, WEIGHTS) if os.path.isdir(path) else path


def load_config(path: str) -> dict[str, Any]:
  cfg = os.path.join(os.path.dirname(weights_path(path)), CONFIG)
  if not os.path.exists(cfg):
    return {}
  with open(cfg) as f:
    return json.load(f)


def is_timm(path: str) -> bool:
  """A `.safetensors` file (or a directory with model.safetensors) whose keys a family reads."""
  weights = weights_path(path)
  if not (weights.endswith('.safetensors') and os.path.isfile(weights)):
    return False
  config = load_config(path)
  if config.get('model_type'):  # A Hugging Face directory.
    return False
  try:
    registry.family_for_timm(config.get('architecture', ''), _keys(weights))
  except ValueError:
    return False
  return True


def read_timm(path: str | os.PathLike, *, model_config: Optional[Mapping[str, Any]] = None
              ) -> tuple[Flat, Architecture, dict[str, Any]]:
  """(flat params, architecture, info with 'class_names' and 'notes') of a timm file or directory.

  model_config: registry fields to fill what a bare file cannot say (e.g. num_heads without a
  config.json); the file's own config wins.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  weights = weights_path(path)
  config = load_config(path)
  state = load_file(weights)
  family = registry.family_for_timm(config.get('architecture', ''), state.keys())
  if model_config and not config.get('model_args'):
    config = {**config, 'model_args': {'num_heads': model_config.get('num_heads')}}
  flat, arch, notes = family.from_timm(state, config)
  names = config.get('label_names') or (config.get('pretrained_cfg') or {}).get('label_names')
  return flat, arch, {'class_names': names, 'notes': notes}


def write_timm(out_dir: str | os.PathLike, flat: Mapping[str, np.ndarray], arch: Architecture,
               class_names: Optional[Sequence[str]] = None) -> str:
  """Writes `model.safetensors` and `config.json` into out_dir; returns the weights' path."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state, config = arch.get_family().to_timm(dict(flat), arch)
  config['vit_jax'] = arch.to_meta()  # Ours (timm ignores it): a round trip keeps the name.
  if class_names:
    config['label_names'] = list(class_names)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, WEIGHTS)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path)
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  return path
