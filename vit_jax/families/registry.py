"""The model registry: every family and every named model, in one place, and each family's interop.

    get_model_config('Swin-T')       -> ConfigDict of the model's fields (+ 'name', 'family')
    create_model(config, num_classes) -> the Flax module (dispatches on config['family'] or name)
    resolve(config.model)            -> (family, fields): a training config's model with overrides
    detect(flat)                     -> the family whose parameter names a flat dict uses
    interop('vit')                   -> the family's `interop.Interop`: to_timm / from_timm /
                                        to_hf / from_hf / reads_timm / writes_npz / npz_keys_ok
    interop_for_timm(arch, keys)     -> the interop that reads a timm checkpoint
    interop_for_hf(model_type)       -> the interop that reads a Hugging Face checkpoint

A family registers itself by being listed in `_FAMILY_MODULES` as (descriptor module, interop
module): the first defines `FAMILY`, an instance of its `base.Family` subclass; the second
`INTEROP`, an instance of its `interop.Interop` subclass built on that descriptor (None: the family
has no counterpart elsewhere, and a plain `Interop` refuses every format naming it). This is the
one place that pairs them (the descriptor never imports its interop) and the one list of families
in the library. `detect` and the timm / Hugging Face look-ups try the families in this order and
take the first that accepts; each family's tests refuse its neighbours' keys (the ViT's refuse a
`dist_token` or a ResNet), so a new family's `matches` and `reads_timm` must refuse the others'.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import ml_collections

from vit_jax.families.base import Architecture, Family
from vit_jax.families.interop import Interop

_FAMILY_MODULES = (('vit', 'vit_interop'), ('deit', 'deit_interop'), ('hybrid', 'hybrid_interop'),
                   ('mixer', 'mixer_interop'), ('swin', 'swin_interop'), ('pvt', 'pvt_interop'))
_FAMILIES: dict[str, Family] = {}
_INTEROPS: dict[str, Interop] = {}  # family name -> its interop
_MODELS: dict[str, str] = {}  # model name -> family name


def register(family: Family, interop: Optional[Interop] = None) -> None:
  """Adds a family, its interop (default: none, a plain `Interop`) and its named models; a model
  name may belong to one family only."""
  if interop is not None and interop.family is not family:
    raise ValueError(f'the interop {interop!r} is built on {interop.family!r}, not {family!r}')
  for model in family.models:
    owner = _MODELS.get(model)
    if owner is not None and owner != family.name:
      raise ValueError(f'model {model!r} is registered by both {owner} and {family.name}')
  _FAMILIES[family.name] = family
  _INTEROPS[family.name] = interop if interop is not None else Interop(family)
  for model in family.models:
    _MODELS[model] = family.name


def _load() -> None:
  for descriptor, interop in _FAMILY_MODULES:
    family = importlib.import_module(f'vit_jax.families.{descriptor}').FAMILY
    register(family, interop and importlib.import_module(f'vit_jax.families.{interop}').INTEROP)


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


def interop(family: str | Family) -> Interop:
  """The interop of a family (by name or descriptor): its timm / Hugging Face / npz maps."""
  name = family if isinstance(family, str) else family.name
  get_family(name)  # a KeyError naming the registered families
  return _INTEROPS[name]


def interop_for_timm(architecture: str, keys: Any) -> Interop:
  """The interop that reads a timm checkpoint of `architecture` (config.json; may be '') whose
  state dict has these keys (its `.family` is the descriptor)."""
  keys = set(keys)
  for found in _INTEROPS.values():
    if found.reads_timm(architecture, keys):
      return found
  raise ValueError(f'timm architecture {architecture!r} belongs to no registered family (families '
                   f'read: {sorted(p for i in _INTEROPS.values() for p in i.timm_prefixes)})')


def interop_for_hf(model_type: str) -> Interop:
  """The interop that reads a Hugging Face checkpoint of this `model_type` (config.json)."""
  for found in _INTEROPS.values():
    if model_type in found.hf_model_types:
      return found
  raise ValueError(f'Hugging Face model_type {model_type!r} belongs to no registered family')


__all__ = ['Architecture', 'Family', 'Interop', 'create_model', 'detect', 'families', 'family_of',
           'family_of_config', 'family_of_module', 'get_family', 'get_model_config', 'interop',
           'interop_for_hf', 'interop_for_timm', 'names', 'override_fields', 'register', 'resolve']

_load()
