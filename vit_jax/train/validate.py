"""Checks a training config before anything heavy starts; every error names the key and the fix."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Sequence

import ml_collections

from vit_jax import sharding as sharding_lib
from vit_jax.families import registry
from vit_jax.shapes import hw
from vit_jax import objectives
from vit_jax.models import vit as vit_models
from vit_jax.train import optim

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
    _validate_model_values(config.model, family)
    family.validate(fields, size)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, ArithmeticError) as e:  # a wrong type: a TypeError
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
        f'cpu_devices must be an integer >= 0 (0: chosen for the model and host), '
        f'got {cpu_devices!r}')
  cache_dir = config.get('compilation_cache_dir', '')
  _need(cache_dir is None or isinstance(cache_dir, str),
        f"compilation_cache_dir must be a directory path ('' for JAX's own setting), got "
        f"{cache_dir!r}")
  _need(isinstance(config.get('skip_nonfinite', False), bool),
        f"skip_nonfinite must be True or False, got {config.get('skip_nonfinite')!r}")
  for key in ('heartbeat_timeout', 'shutdown_timeout'):
    value = config.get(key, 1)
    _need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f'{key} must be a whole number of seconds > 0, got {value!r}')
  _need(config.optimizer in ('adam', 'sgd'), f"optimizer {config.optimizer!r}: 'adam' or 'sgd'")
  _need(config.lr_decay in optim.DECAYS, f'lr_decay {config.lr_decay!r}: one of {optim.DECAYS}')
  _need(config.get('posemb_resize') in (None, 'bilinear', 'bicubic', 'linear'),
        f"posemb_resize {config.get('posemb_resize')!r}: 'bilinear', 'bicubic', 'linear' or unset "
        "(the family's default)")
  _need(0 <= config.ema_decay < 1, 'ema_decay must be in [0, 1) (0: off)')
  _need(config.dtype in ('auto', 'float32', 'bfloat16', 'float16'),
        f"dtype {config.dtype!r}: 'auto', 'float32', 'bfloat16' or 'float16'")
  _validate_mesh(config.mesh)
  from vit_jax.data import PRESETS  # pylint: disable=g-import-not-at-top
  _need(config.augment in PRESETS, f'augment {config.augment!r}: one of {sorted(PRESETS)}')
  _validate_objective(config, family)
  _validate_fewshot(config)
  _validate_ranges(config)
  if config.get('randaugment'):
    _need(re.fullmatch(r'\d+,\d+', str(config.randaugment)) is not None,
          f"randaugment {config.randaugment!r} must be 'layers,magnitude', e.g. '2,15'")


def _validate_fewshot(config: ml_collections.ConfigDict) -> None:
  """`fewshot.*` (when datasets are given): shots, seeds, method and its parameters in range."""
  fs = config.get('fewshot')
  from vit_jax.eval import fewshot as fewshot_lib  # pylint: disable=g-import-not-at-top
  if fs is None or not fewshot_lib.datasets_of(fs.get('datasets')):
    return
  shots = fs.shots if isinstance(fs.shots, (tuple, list)) else (fs.shots,)
  _need(len(shots) > 0 and all(isinstance(s, int) and s > 0 for s in shots),
        f'fewshot.shots {fs.shots!r} must be positive integers, e.g. (1, 5, 10, 25)')
  _need(isinstance(fs.seeds, int) and fs.seeds > 0, f'fewshot.seeds must be >= 1, got {fs.seeds!r}')
  _need(fs.method in fewshot_lib.METHODS,
        f'fewshot.method {fs.method!r}: one of {fewshot_lib.METHODS}')
  _need(fs.l2_reg > 0, f'fewshot.l2_reg must be > 0, got {fs.l2_reg!r}')
  _need(isinstance(fs.k, int) and fs.k > 0, f'fewshot.k must be >= 1, got {fs.k!r}')
  _need(isinstance(fs.every, int) and fs.every >= 0,
        f'fewshot.every must be >= 0 (0: with every evaluation), got {fs.every!r}')


def _validate_objective(config: ml_collections.ConfigDict, family) -> None:
  """The objective's block and the keys it reads, and whether the model's family can serve it
  (`vit_jax.objectives`): a DeiT for distillation, token masks for MPP and MAE, prompts for VPT."""
  try:
    objectives.check(config, family)
  except ValueError as e:
    message = str(e)
    if objectives.name_of(config) == 'distill' and 'two_heads' in message:
      deit = [n for n in registry.names()
              if 'two_heads' in registry.family_of(n).capabilities]
      message = (f'distill.teacher is set, but the student {config.model.name} ({family.name} '
                 f'family) has no distillation head ({message.split(": ", 1)[-1]}); distil into '
                 f'a DeiT: one of {deit}')
    raise ConfigError(message) from e
  # Keys outside any objective's block that only some objectives can use.
  if not objectives.get(objectives.name_of(config)).uses_labels:
    for key in ('mixup', 'cutmix', 'label_smoothing'):
      _need(not config.get(key), f'{key} mixes or smooths labels, and objective '
            f'{objectives.name_of(config)!r} trains without them: set --config.{key}=0')


def _is_number(v: Any, integer: bool = False) -> bool:
  kinds = int if integer else (int, float)
  return isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v)


def _validate_ranges(config: ml_collections.ConfigDict) -> None:
  """Numbers outside their range (negative counts, fractions >= 1, NaN, infinities), `channels`."""
  def number(key: str, lo: float, hi: float | None = None, integer: bool = False) -> None:
    if key in config:
      v = config[key]
      ok = _is_number(v, integer) and v >= lo and (hi is None or v < hi)
      _need(ok, f'{key} must be {"an integer" if integer else "a finite number"} in [{lo}, '
            f'{"inf" if hi is None else hi}), got {v!r}')

  for key in ('workers', 'prefetch', 'keep_every', 'eval_batch_size', 'fsdp_min_size', 'seed'):
    number(key, 0, integer=True)
  number('keep_last', 1, integer=True)
  for key in ('base_lr', 'end_lr', 'grad_clip_norm', 'weight_decay', 'mixup', 'cutmix'):
    number(key, 0)
  for key in ('held_out', 'b1', 'b2', 'momentum'):
    number(key, 0, 1)
  _need(config.channels in (1, 3), f'channels must be 1 (grey) or 3 (RGB), got {config.channels!r}')


def _validate_mesh(mesh: Any) -> None:
  """((axis, size), ...): distinct axes of sharding.AXES, sizes >= 1 or one -1 (the rest)."""
  example = "(('data', -1), ('fsdp', 1), ('tensor', 1))"
  try:
    pairs = [(name, size) for name, size in mesh]
  except (TypeError, ValueError) as e:
    raise ConfigError(f'mesh {mesh!r} must be pairs (axis, size) like {example}: {e}') from e
  names = [n for n, _ in pairs]
  _need(all(n in sharding_lib.AXES for n in names) and len(set(names)) == len(names),
        f'mesh {mesh!r}: axes must be distinct names from {sharding_lib.AXES}, e.g. {example}')
  _need(all(_is_number(n, integer=True) and (n >= 1 or n == -1) for _, n in pairs),
        f'mesh {mesh!r}: sizes must be integers >= 1, or -1 for "the remaining devices"')
  _need([n for _, n in pairs].count(-1) <= 1, f'mesh {mesh!r}: at most one axis may be -1')


def _validate_model_values(model: ml_collections.ConfigDict, family) -> None:
  """Overrides of numeric and boolean model fields, judged by the module's annotation of the field:
  `int` a positive integer (>= 0 where Optional: 0 is none), `Sequence[int]` a tuple of them, an
  int or an (h, w) pair where both are allowed (`patch_size` 16 or (16, 8)); `float` finite, in
  [0, 1) for rates (`*rate*`, `*drop*`, `stochastic*`), > 0 for `*ratio*`; `bool` True or False."""
  kinds = {f.name: str(f.type) for f in dataclasses.fields(family.module_class())}
  for key, value in model.items():
    kind = kinds.get(key, '')
    if key in ('name', 'family') or value is None or not re.search(r'\b(int|float|bool)\b', kind):
      continue
    where = f'model.{key} {value!r}'
    if kind == 'bool':
      _need(isinstance(value, bool), f'{where} must be True or False')
      continue
    if re.search(r'\bstr\b', kind):  # Union[bool, str]: remat, a flag or a policy name
      _need(isinstance(value, bool) or (isinstance(value, str) and (
          key != 'remat' or value in vit_models.REMAT_POLICIES)),
            f'{where} must be True, False or a policy: {", ".join(sorted(vit_models.REMAT_POLICIES))}')
      continue
    outer = re.sub(r'(Sequence|tuple|list|Tuple|List)\[[^\]]*\]', 'SEQ', kind)
    scalar_ok, seq_ok = re.search(r'\b(int|float)\b', outer), 'SEQ' in outer
    is_seq = isinstance(value, (tuple, list))
    pair = scalar_ok and seq_ok  # `n` or `(h, w)`, as patch_size and window_size
    _need((seq_ok and (not pair or len(value) == 2)) if is_seq else bool(scalar_ok),
          f'{where} must be {"a tuple" if not scalar_ok else "a single number"}'
          f'{" or an (h, w) pair" if pair else ""} ({kind})')
    for v in (value if is_seq else [value]):
      if 'float' in kind:
        lo, hi = ((0, 1) if re.search(r'rate|drop|stochastic', key) else
                  (0, None) if 'ratio' in key else (None, None))
        _need(_is_number(v) and (lo is None or v >= lo) and (hi is None or v < hi) and
              ('ratio' not in key or v > 0),
              f'{where} must be a finite number{f" in [{lo}, {hi})" if hi else ""}'
              f'{" > 0" if "ratio" in key else ""}')
      else:
        _need(_is_number(v, integer=True) and (v > 0 or (v == 0 and 'Optional' in kind)),
              f'{where} must be a positive integer{" (or a tuple of them)" if seq_ok else ""}')


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  process_count: int = 1) -> None:
  """What needs the device count (call it once devices exist, before anything is compiled): the
  mesh multiplies out to the devices, and every batch splits evenly over the data-parallel
  devices (data x fsdp axes) and the processes."""
  try:
    shape = sharding_lib.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(f'mesh: {e}; change --config.mesh (sizes multiply to the device count; -1 '
                      f'takes the rest)') from e
  shards = math.lcm(math.prod(shape[a] for a in sharding_lib.BATCH_AXES), process_count)
  micro = config.batch_size // config.accum_steps
  _need(micro % shards == 0,
        f'batch_size {config.batch_size} / accum_steps {config.accum_steps} = {micro} must be a '
        f'multiple of {shards} (devices on the data and fsdp mesh axes {shape}, and '
        f'{process_count} process(es)); change --config.batch_size')
  eval_bs = config.get('eval_batch_size') or config.batch_size
  _need(eval_bs % shards == 0,
        f'eval_batch_size {eval_bs} must be a multiple of {shards} (devices on the data and fsdp '
        f'mesh axes, and processes); change --config.eval_batch_size')
