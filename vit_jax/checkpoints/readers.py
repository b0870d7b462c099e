"""`read_checkpoint(path)`: any supported checkpoint -> flat parameters in its family's file layout.

A registry of readers, tried in order; each has a `detect(path) -> bool` and a
`read(path, **kwargs) -> Checkpoint`. Built in:
  npz    Google's released `.npz` files (vit_jax and big_vision layouts)     checkpoints/npz.py
  hf     a Hugging Face directory of a registered family                    formats/hf.py
  timm   a timm `model.safetensors` file, or a directory with one           formats/timm.py
  orbax  this project's orbax checkpoints (a step directory or a workdir)   checkpoints/manager.py
`register_reader` adds more (put a specific reader before a catch-all one with `first=True`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.formats import hf as hf_format
from vit_jax.formats import timm as timm_format

Flat = dict[str, np.ndarray]


@dataclasses.dataclass
class Checkpoint:
  """Parameters read from disk, in this project's unscanned flat layout ('/'-joined paths).

  format: 'npz/vit_jax', 'npz/big_vision', 'timm', 'hf' or 'orbax'. architecture: set when the
  source carries one (timm/HF configs, orbax metadata); else `registry.detect(params).infer(...)`.
  class_names: from the source's metadata, when present. notes: conversions made while reading.
  objective: how a run of this project trained it (`{'name', 'config', ...}`, see
  `vit_jax.objectives`), None for other sources; objective_params: that objective's own
  parameters ('objective/...' paths: a mask embedding, a decoder, prompts), never in `params`.
  """
  params: Flat
  format: str
  path: str
  architecture: Optional[Architecture] = None
  class_names: Optional[list[str]] = None
  notes: list[str] = dataclasses.field(default_factory=list)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  objective: Optional[dict[str, Any]] = None
  objective_params: Flat = dataclasses.field(default_factory=dict)


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

def _read_hf(path: str, **unused: Any) -> Checkpoint:
  flat, arch, info = hf_format.read_hf(path)
  return Checkpoint(flat, 'hf', path, arch, info['class_names'], info['notes'])


def _read_timm(path: str, *, model_config: Optional[dict] = None, **unused: Any) -> Checkpoint:
  flat, arch, info = timm_format.read_timm(path, model_config=model_config)
  return Checkpoint(flat, 'timm', path, arch, info['class_names'], info['notes'])


# ---------- this project's own checkpoints ----------

def _is_orbax(path: str) -> bool:
  return os.path.isdir(path)


def architecture_from_meta(meta: dict[str, Any]) -> Optional[Architecture]:
  """The architecture a run's or converted checkpoint's metadata records (one schema:
  `Architecture.to_meta()` under 'architecture'); runs written before it carry 'model' fields."""
  if meta.get('architecture'):
    return Architecture.from_meta(meta['architecture'])
  cfg = meta.get('model_config') or meta.get('model')
  if cfg and 'image_size' in meta:
    cfg = dict(cfg)
    if meta.get('model_name'):
      cfg.setdefault('name', meta['model_name'])
    return Architecture.from_meta({'model_config': cfg, 'num_classes': meta.get('num_classes'),
                                   'image_size': meta['image_size'],
                                   'channels': meta.get('channels', 3)})
  return None


def _read_orbax(path: str, **unused: Any) -> Checkpoint:
  from vit_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  try:
    tree, meta = manager.load_params(path)
  except manager.CheckpointError as e:
    raise ValueError(f'{path}: not a checkpoint this project reads (tried: {", ".join(reader_names())}'
                     f'); as an orbax checkpoint: {e}') from e
  meta = dict(meta or {})
  arch = architecture_from_meta(meta)
  family = arch.get_family() if arch is not None else registry.get_family('vit')
  tree = dict(tree.get('params', tree))
  from vit_jax import objectives  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  own = tree.pop(objectives.OBJECTIVE_KEY, None) or {}
  tree = family.to_file_layout(tree)
  flat = {k: np.asarray(v) for k, v in params_lib.flatten(tree).items()}
  own_flat = {f'{objectives.OBJECTIVE_KEY}/{k}': np.asarray(v)
              for k, v in params_lib.flatten(own).items()}
  names = meta.get('class_names')
  objective, notes = None, []
  if meta.get('objective'):
    cls, objective = objectives.of_meta(meta)
    # An objective that kept frozen parameters out of its checkpoints loads them back.
    flat, notes = cls.complete(objective, flat, arch, meta.get('config') or {})
  return Checkpoint(flat, 'orbax', path, arch, list(names) if names else None, notes, meta=meta,
                    objective=objective, objective_params=own_flat)


register_reader('npz', lambda p: os.path.isfile(p) and p.endswith('.npz'), _read_npz)
register_reader('hf', hf_format.is_hf_dir, _read_hf)
register_reader('timm', timm_format.is_timm, _read_timm)
register_reader('orbax', _is_orbax, _read_orbax)


def read_checkpoint(path: str | os.PathLike, **kwargs: Any) -> Checkpoint:
  """Reads any supported checkpoint (see the module docstring) into this project's flat layout.

  kwargs go to the reader (e.g. model_config for a timm file without config.json). Raises
  FileNotFoundError for a missing path and ValueError naming the known formats otherwise.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  for reader in _READERS:
    if reader.detect(path):
      return reader.read(path, **kwargs)
  raise ValueError(f'{path}: not a checkpoint format this project reads; known: '
                   f'{", ".join(reader_names())}')
