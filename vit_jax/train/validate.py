"""Checks a training config before anything heavy starts; every error names the key and the fix."""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Sequence

import ml_collections

from vit_jax import sharding as sharding_lib
from vit_jax.families import registry
from vit_jax.families.base import hw
from vit_jax.train import optim, step as step_lib

REQUIRED = ('model.name', 'dataset', 'data_dir', 'image_size', 'batch_size', 'total_steps',
            'warmup_steps', 'base_lr', 'eval_every', 'checkpoint_every', 'seed', 'mesh')


class ConfigError(ValueError):
  """A config key is unknown, missing or has a bad value."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every leaf key as a dotted path, sorted."""
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys += flat_keys(v, f'{prefix}{k}.')
    else:
      keys.append(f'{prefix}{k}')
  return sorted(keys)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/pretrain.py:model=ViT-B_16,dataset=cifar10' -> get_config(arg) of that file."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location('_vit_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: Sequence[str], flag: str = 'config') -> None:
  """Refuses `--config.KEY=...` arguments whose KEY the config file does not have."""
  spec = None
  for i, a in enumerate(argv):
    if a.startswith(f'--{flag}='):
      spec = a.split('=', 1)[1]
    elif a == f'--{flag}' and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None:
    return
  valid = flat_keys(load_config_file(spec))
  for a in argv:
    m = re.match(rf'^--{flag}\.([^=\s]+)', a)
    if m and m.group(1) not in valid:
      raise ConfigError(f'unknown config key {m.group(1)!r}. Valid keys: {", ".join(valid)}')


def _need(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a missing key or a bad value."""
  keys = set(flat_keys(config))
  missing = [k for k in REQUIRED if k not in keys]
  _need(not missing, f'config lacks {missing}; start from configs/common.py')
  _need(config.model.name in registry.names(),
        f'model.name {config.model.name!r} is not registered; one of {registry.names()}')
  try:
    size = hw(config.image_size)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'image_size {config.image_size!r} must be an int or (height, width)') from e
  try:
    family, fields = registry.resolve(config.model)
    family.validate(fields, size)
  except (ValueError, TypeError, KeyError) as e:  # a wrong type reads as a TypeError here
    raise ConfigError(f'model: {e}') from e
  for key in ('batch_size', 'total_steps', 'accum_steps', 'channels'):
    _need(isinstance(config[key], int) and config[key] > 0, f'{key} must be a positive integer')
  _need(config.batch_size % config.accum_steps == 0,
        f'batch_size {config.batch_size} is not divisible by accum_steps {config.accum_steps}')
  _need(0 <= config.warmup_steps <= config.total_steps,
        f'warmup_steps {config.warmup_steps} must be within [0, total_steps={config.total_steps}]')
  _need(config.base_lr > 0, f'base_lr must be > 0, got {config.base_lr}')
  for key in ('eval_every', 'checkpoint_every', 'log_every'):
    _need(config[key] >= 0, f'{key} must be >= 0 (0: only at the end)')
  cpu_devices = config.get('cpu_devices', 0)
  _need(isinstance(cpu_devices, int) and cpu_devices >= 0,
        f'cpu_devices must be an integer >= 0 (0: one CPU device), got {cpu_devices!r}')
  _need(config.optimizer in ('adam', 'sgd'), f"optimizer {config.optimizer!r}: 'adam' or 'sgd'")
  _need(config.lr_decay in optim.DECAYS, f'lr_decay {config.lr_decay!r}: one of {optim.DECAYS}')
  _need(config.loss in step_lib.LOSSES, f'loss {config.loss!r}: one of {step_lib.LOSSES}')
  _need(0 <= config.label_smoothing < 1, 'label_smoothing must be in [0, 1)')
  _need(config.get('posemb_resize') in (None, 'bilinear', 'bicubic'),
        f"posemb_resize {config.get('posemb_resize')!r}: 'bilinear', 'bicubic' or unset (the "
        "family's default)")
  _need(0 <= config.ema_decay < 1, 'ema_decay must be in [0, 1) (0: off)')
  _need(config.dtype in ('auto', 'float32', 'bfloat16', 'float16'),
        f"dtype {config.dtype!r}: 'auto', 'float32', 'bfloat16' or 'float16'")
  try:
    for name, n in config.mesh:
      _need(name in sharding_lib.AXES and int(n) != 0, f'bad mesh axis {(name, n)}')
  except (TypeError, ValueError) as e:
    raise ConfigError(f'mesh {config.mesh!r} must be like ((\'data\', -1), (\'fsdp\', 1), '
                      f'(\'tensor\', 1)) with axes from {sharding_lib.AXES}: {e}') from e
  from vit_jax.data import PRESETS  # pylint: disable=g-import-not-at-top
  _need(config.augment in PRESETS, f'augment {config.augment!r}: one of {sorted(PRESETS)}')
  _validate_distill(config, family)
  if config.get('randaugment'):
    _need(re.fullmatch(r'\d+,\d+', str(config.randaugment)) is not None,
          f"randaugment {config.randaugment!r} must be 'layers,magnitude', e.g. '2,15'")


def _validate_distill(config: ml_collections.ConfigDict, family) -> None:
  """`distill.*`: kind, alpha and temperature in range; a teacher needs a DeiT student and a
  path that exists."""
  distill = config.get('distill')
  if distill is None:
    return
  _need(distill.kind in step_lib.DISTILL_KINDS,
        f'distill.kind {distill.kind!r}: one of {step_lib.DISTILL_KINDS}')
  _need(isinstance(distill.alpha, (int, float)) and 0 <= distill.alpha <= 1,
        f'distill.alpha must be in [0, 1], got {distill.alpha!r}')
  _need(isinstance(distill.temperature, (int, float)) and distill.temperature > 0,
        f'distill.temperature must be > 0, got {distill.temperature!r}')
  if not distill.teacher:
    return
  if not step_lib.has_distillation_head(family.module_class()):
    deit = [n for n in registry.names() if step_lib.has_distillation_head(
        registry.family_of(n).module_class())]
    raise ConfigError(f'distill.teacher is set, but the student {config.model.name} ({family.name} '
                      f'family) has no distillation head; distil into a DeiT: one of {deit}')
  _need(os.path.exists(distill.teacher),
        f'distill.teacher {distill.teacher!r} does not exist (a run workdir, .npz, timm or Hugging '
        'Face checkpoint)')
