"""`read_checkpoint(path)`: any supported checkpoint -> flat parameters in this project's layout.

A registry of readers, tried in order; each has a `detect(path) -> bool` and a
`read(path, **kwargs) -> Checkpoint`. Built in:
  npz    Google's released `.npz` files (vit_jax and big_vision layouts)       checkpoints/npz.py
  hf     a Hugging Face ViT directory (config.json with model_type "vit")      convert/hf.py
  timm   a timm `model.safetensors` file, or a directory with one               convert/timm.py
  orbax  this project's orbax checkpoints (a step directory or a workdir): the ORBAX HOOK below
         calls `vit_jax.checkpoints.manager.load_params(path) -> (params_tree, meta_dict)`.
`register_reader` adds more (put a specific reader before a catch-all one with `first=True`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Optional

import numpy as np

from vit_jax.checkpoints.arch import Architecture

Flat = dict[str, np.ndarray]


@dataclasses.dataclass
class Checkpoint:
  """Parameters read from disk, in this project's unscanned flat layout ('/'-joined paths).

  format: 'npz/vit_jax', 'npz/big_vision', 'timm', 'hf' or 'orbax'. architecture: set when the
  source carries one (timm/HF configs, orbax metadata); else `infer_architecture(params)`.
  class_names: from the source's metadata, when present. notes: conversions made while reading.
  """
  params: Flat
  format: str
  path: str
  architecture: Optional[Architecture] = None
  class_names: Optional[list[str]] = None
  notes: list[str] = dataclasses.field(default_factory=list)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Reader:
  name: str
  detect: Callable[[str], bool]
  read: Callable[..., Checkpoint]


_READERS: list[Reader] = []


def register_reader(name: str, detect: Callable[[str], bool], read: Callable[..., Checkpoint],
                    *, first: bool = False) -> None:
  """Adds (or replaces, by name) a reader; `first` puts it ahead of the others."""
  global _READERS
  _READERS = [r for r in _READERS if r.name != name]
  entry = Reader(name, detect, read)
  _READERS = [entry] + _READERS if first else _READERS + [entry]


def reader_names() -> list[str]:
  return [r.name for r in _READERS]


# ---------- npz ----------

def _read_npz(path: str, **unused: Any) -> Checkpoint:
  from vit_jax.checkpoints import npz  # pylint: disable=import-outside-toplevel
  flat, info = npz.read_npz(path)
  return Checkpoint(flat, f'npz/{info["layout"]}', path, notes=info['notes'])


# ---------- Hugging Face and timm ----------

def _is_hf(path: str) -> bool:
  from vit_jax.convert import hf  # pylint: disable=import-outside-toplevel
  return hf.is_hf_dir(path)


def _read_hf(path: str, **unused: Any) -> Checkpoint:
  from vit_jax.convert import hf  # pylint: disable=import-outside-toplevel
  flat, arch, info = hf.read_hf(path)
  return Checkpoint(flat, 'hf', path, arch, info['class_names'], info['notes'])


def _safetensors_keys(path: str) -> list[str]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework='numpy') as f:
    return list(f.keys())


def _is_timm(path: str) -> bool:
  from vit_jax.convert import timm  # pylint: disable=import-outside-toplevel
  weights = os.path.join(path, timm.WEIGHTS) if os.path.isdir(path) else path
  return (weights.endswith('.safetensors') and os.path.isfile(weights)
          and timm.is_timm_state(_safetensors_keys(weights)))


def _read_timm(path: str, *, num_heads: Optional[int] = None, **unused: Any) -> Checkpoint:
  from vit_jax.convert import timm  # pylint: disable=import-outside-toplevel
  flat, arch, info = timm.read_timm(path, num_heads=num_heads)
  return Checkpoint(flat, 'timm', path, arch, info['class_names'], info['notes'])


# ---------- ORBAX HOOK: this project's own checkpoints ----------
# The lead's `vit_jax/checkpoints/manager.py` provides `load_params(path) -> (params_tree, meta)`
# for a step directory or a workdir (its latest step). Until it exists this reader detects nothing.
# meta keys used here when present: 'architecture' (an `Architecture.to_meta()` dict) or
# 'model' (or 'model_config': VisionTransformer fields) + 'model_name' + 'num_classes' + 'image_size'
# + 'channels' (what train/loop.py's run_meta writes), and 'class_names'.

def _orbax_manager():
  try:
    manager = importlib.import_module('vit_jax.checkpoints.manager')
  except ImportError:
    return None
  return manager if hasattr(manager, 'load_params') else None


def _is_orbax(path: str) -> bool:
  return os.path.isdir(path) and _orbax_manager() is not None


def _read_orbax(path: str, **unused: Any) -> Checkpoint:
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  try:
    tree, meta = _orbax_manager().load_params(path)
  except RuntimeError as e:  # The manager's CheckpointError: say which formats were tried.
    raise ValueError(f'{path}: not a checkpoint this project reads (tried: {", ".join(reader_names())}'
                     f'); as an orbax checkpoint: {e}') from e
  meta = dict(meta or {})
  tree = params_lib.unstack_blocks(dict(tree.get('params', tree)))
  flat = {k: np.asarray(v) for k, v in params_lib.flatten(tree).items()}
  arch = None
  cfg = meta.get('model_config') or meta.get('model')  # The trainer's run_meta writes 'model'.
  if 'architecture' in meta:
    arch = Architecture.from_meta(meta['architecture'])
  elif cfg and 'image_size' in meta:
    cfg = dict(cfg)
    if meta.get('model_name'):
      cfg.setdefault('name', meta['model_name'])
    arch = Architecture.from_meta({'model_config': cfg, 'num_classes': meta.get('num_classes'),
                                   'image_size': meta['image_size'],
                                   'channels': meta.get('channels', 3)})
  names = meta.get('class_names')
  return Checkpoint(flat, 'orbax', path, arch, list(names) if names else None, meta=meta)


register_reader('npz', lambda p: os.path.isfile(p) and p.endswith('.npz'), _read_npz)
register_reader('hf', _is_hf, _read_hf)
register_reader('timm', _is_timm, _read_timm)
register_reader('orbax', _is_orbax, _read_orbax)


def read_checkpoint(path: str | os.PathLike, **kwargs: Any) -> Checkpoint:
  """Reads any supported checkpoint (see the module docstring) into this project's flat layout.

  kwargs go to the reader (e.g. num_heads for a timm file without config.json). Raises
  FileNotFoundError for a missing path and ValueError naming the known formats otherwise.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  for reader in _READERS:
    if reader.detect(path):
      return reader.read(path, **kwargs)
  hint = ('' if _orbax_manager() else
          ' (orbax checkpoints need vit_jax.checkpoints.manager.load_params)')
  raise ValueError(f'{path}: not a checkpoint format this project reads; known: '
                   f'{", ".join(reader_names())}{hint}')
