"""The objective registry: every way of training, in one place.

    names()                       -> registered objective names
    get(name)                     -> the Objective subclass
    config_blocks()               -> {config key: defaults} of every objective that owns a block
    name_of(config)               -> the run's objective name (config.objective.name)
    create(config, family, ...)   -> the run's Objective instance, its config checked
    of_meta(meta)                 -> (class, objective meta) of a checkpoint's metadata

An objective registers itself by being listed in `_OBJECTIVE_MODULES`: each module defines
`OBJECTIVE`, its `Objective` subclass. Nothing else in the library lists objectives.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

from vit_jax.objectives.base import Objective

_OBJECTIVE_MODULES = ('classify', 'distill', 'mpp', 'mae', 'prompt')
_OBJECTIVES: dict[str, type[Objective]] = {}
DEFAULT = 'classify'


def register(cls: type[Objective]) -> None:
  keys = {o.config_key for o in _OBJECTIVES.values() if o.config_key and o.name != cls.name}
  if cls.config_key and cls.config_key in keys:
    raise ValueError(f'config block {cls.config_key!r} is owned by another objective')
  _OBJECTIVES[cls.name] = cls


def _load() -> None:
  for module in _OBJECTIVE_MODULES:
    register(importlib.import_module(f'vit_jax.objectives.{module}').OBJECTIVE)


def names() -> list[str]:
  return list(_OBJECTIVES)


def get(name: str) -> type[Objective]:
  if name not in _OBJECTIVES:
    raise KeyError(f'unknown objective {name!r}; registered: {", ".join(_OBJECTIVES)}')
  return _OBJECTIVES[name]


def config_blocks() -> dict[str, dict[str, Any]]:
  """{config key: its defaults} of every objective that owns a config block."""
  return {o.config_key: o.defaults() for o in _OBJECTIVES.values() if o.config_key}


def name_of(config: Mapping[str, Any]) -> str:
  """The run's objective: `config.objective.name`. A classification config with a distillation
  teacher set (`distill.teacher`, how distillation was asked for before objectives existed) is a
  distillation run."""
  block = config.get('objective') or {}
  name = block.get('name') or DEFAULT
  distill = config.get('distill') or {}
  if name == DEFAULT and distill.get('teacher'):
    return 'distill'
  return name


def check(config: Mapping[str, Any], family: Any = None) -> type[Objective]:
  """The run's objective class, its config checked against it and the family (ValueError naming
  the key, or the family and its reason)."""
  name = name_of(config)
  if name not in _OBJECTIVES:
    raise ValueError(f'objective.name {name!r} is not one of {names()}')
  cls = _OBJECTIVES[name]
  cls.check_config(config, family)
  return cls


def create(config: Mapping[str, Any], family: Any = None,
           fields: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None, *,
           teacher_model: Optional[str] = None, **kwargs: Any) -> Objective:
  """The run's objective bound to its config, model family and fields and dataset classes.
  teacher_model: a registered architecture whose shapes stand in for a distillation teacher (a
  plan of distillation without a teacher checkpoint)."""
  if teacher_model:
    cls = get('distill')
    why = family.missing_capability(cls.needs) if family is not None else None
    if why:
      raise ValueError(f'a teacher ({teacher_model}) needs a student with a distillation head (a '
                       f'DeiT model): {why}')
    return cls(config, family=family, fields=fields, num_classes=num_classes,
               teacher_model=teacher_model, **kwargs)
  cls = check(config, family)
  return cls(config, family=family, fields=fields, num_classes=num_classes, **kwargs)


def from_keywords(model: Any = None, *, loss: str = 'softmax_xent', label_smoothing: float = 0.0,
                  distill: Any = None) -> Objective:
  """An objective from keywords, for library callers and tests that build a step by hand:
  classification with `loss` and `label_smoothing`, or distillation from `distill`'s placed
  teacher (a `distill.Distillation`; the student `model` must have two heads)."""
  config = {'loss': loss, 'label_smoothing': label_smoothing}
  if distill is None:
    return get(DEFAULT)(config)
  cls = get('distill')
  from vit_jax.families import registry as families  # pylint: disable=import-outside-toplevel
  why = families.family_of_module(model).missing_capability(cls.needs)
  if why:
    raise ValueError(f'distillation needs a student with a distillation head (a DeiT model); '
                     f'{type(model).__name__}: {why}')
  return cls(config, teacher=distill)


def of_meta(meta: Optional[Mapping[str, Any]]) -> tuple[type[Objective], dict[str, Any]]:
  """(class, objective meta) of a checkpoint's metadata; checkpoints written before objectives
  existed were classification runs."""
  objective = dict((meta or {}).get('objective') or {'name': DEFAULT, 'config': {}})
  return get(objective['name']), objective


__all__ = ['DEFAULT', 'check', 'config_blocks', 'create', 'from_keywords', 'get', 'name_of',
           'names', 'of_meta', 'register']

_load()
