"""The model registry: every family and every named model, in one place.

    get_model_config('Swin-T')       -> ConfigDict of the model's fields (+ 'name', 'family')
    create_model(config, num_classes) -> the Flax module (dispatches on config['family'] or name)
    resolve(config.model)            -> (family, fields): a training config's model with overrides
    detect(flat)                     -> the family whose parameter names a flat dict uses

A family registers itself by being listed in `_FAMILY_MODULES`: each module defines `FAMILY`, an
instance of its `Family` subclass. Nothing else in the library lists families.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import ml_collections

from vit_jax.families.base import Architecture, Family

_FAMILY_MODULES = ('vit', 'deit', 'hybrid', 'mixer', 'swin', 'pvt', 'eva', 'beit')
_FAMILIES: dict[str, Family] = {}
_MODELS: dict[str, str] = {}  # model name -> family name


def register(family: Family) -> None:
  """Adds a family and its named models; a model name may belong to one family only."""
  for model in family.models:
    owner = _MODELS.get(model)
    if owner is not None and owner != family.name:
      raise ValueError(f'model {model!r} is registered by both {owner} and {family.name}')
  _FAMILIES[family.name] = family
  for model in family.models:
    _MODELS[model] = family.name


def _load() -> None:
  for module in _FAMILY_MODULES:
    register(importlib.import_module(f'vit_jax.families.{module}').FAMILY)


def families() -> list[Family]:
  """Every registered family, in registration order."""
  return list(_FAMILIES.values())


def get_family(name: str) -> Family:
  if name not in _FAMILIES:
    raise KeyError(f'unknown model family {name!r}; registered: {", ".join(_FAMILIES)}')
  return _FAMILIES[name]


def names(family: Optional[str] = None) -> list[str]:
  """Every registered model name (of one family when given), sorted."""
  return sorted(m for m, f in _MODELS.items() if family is None or f == family)


def family_of(model_name: str) -> Family:
  if model_name not in _MODELS:
    raise KeyError(f'unknown model {model_name!r}; registered models: {", ".join(names())}')
  return _FAMILIES[_MODELS[model_name]]


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """A fresh config of the named model: its family's fields plus 'name' and 'family'."""
  family = family_of(name)
  return ml_collections.ConfigDict(dict(family.models[name], name=name, family=family.name))


def family_of_config(config: Mapping[str, Any]) -> Family:
  """The family a fields dict belongs to ('family' key, else its registered 'name', else ViT)."""
  if config.get('family'):
    return get_family(config['family'])
  if config.get('name') in _MODELS:
    return family_of(config['name'])
  return get_family('vit')  # Field dicts written before families existed describe ViTs.


def family_of_module(model: Any) -> Family:
  """The family whose module class is exactly `type(model)` (a hybrid is not a ViT here)."""
  for family in _FAMILIES.values():
    if type(model) is family.module_class():
      return family
  raise ValueError(f'{type(model).__name__} is not the module of a registered family')


def create_model(config: Mapping[str, Any], num_classes: Optional[int], **overrides: Any):
  """Builds the module of a model config (see `get_model_config`) with keyword overrides."""
  return family_of_config(config).create(dict(config), num_classes, **overrides)


def override_fields() -> list[str]:
  """Every field any family takes: the `--config.model.*` slots of a training config."""
  out = set()
  for family in _FAMILIES.values():
    out |= set(family.field_names())
  return sorted(out)


def resolve(model: Mapping[str, Any]) -> tuple[Family, dict[str, Any]]:
  """A training config's `model` block -> (family, fields): the registered fields of model.name with
  every non-None override applied. An override the family does not take is a ValueError naming it
  and the family's fields. `representation_size=0` means none (a None override keeps the registry's).
  """
  name = model['name']
  family = family_of(name)
  fields = dict(family.models[name], name=name)
  valid = set(family.field_names())
  for key, value in model.items():
    if key in ('name', 'family') or value is None:
      continue
    if key not in valid:
      raise ValueError(f'model.{key} is not a field of the {family.name} family (model {name}); '
                       f'its fields: {", ".join(sorted(valid))}')
    fields[key] = None if (key == 'representation_size' and value == 0) else value
  return family, family.normalize_fields(fields)


def detect(flat: Mapping[str, Any]) -> Family:
  """The family whose parameter names `flat` (file layout) uses; ValueError if none does."""
  found = [f for f in _FAMILIES.values() if f.matches(flat)]
  if not found:
    keys = sorted(flat)[:8]
    raise ValueError(f'the parameters match no registered family ({", ".join(_FAMILIES)}); '
                     f'first keys: {keys}')
  return found[0]


def family_for_timm(architecture: str, keys: Any) -> Family:
  """The family that reads a timm checkpoint of `architecture` (config.json; may be '') whose state
  dict has these keys."""
  keys = set(keys)
  for family in _FAMILIES.values():
    if family.reads_timm(architecture, keys):
      return family
  raise ValueError(f'timm architecture {architecture!r} belongs to no registered family (families '
                   f'read: {sorted(p for f in _FAMILIES.values() for p in f.timm_prefixes)})')


def family_for_hf(model_type: str) -> Family:
  for family in _FAMILIES.values():
    if model_type in family.hf_model_types:
      return family
  raise ValueError(f'Hugging Face model_type {model_type!r} belongs to no registered family')


__all__ = ['Architecture', 'Family', 'create_model', 'detect', 'families', 'family_of',
           'family_for_hf', 'family_for_timm', 'family_of_config', 'family_of_module', 'get_family',
           'get_model_config', 'names', 'override_fields', 'register', 'resolve']

_load()
