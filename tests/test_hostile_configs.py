"""Hostile `--config.*` values: wrong types, negative or zero counts, fractions out of [0, 1), NaN
and infinities, model sizes that do not divide, meshes that do not multiply to the device count,
batches that do not split over the devices. Each is refused naming the key, before anything is
compiled (type errors by the flag parser, values by `vit_jax.train.validate`); each valid value is
accepted. Counts go to $VIT_JAX_RELIABILITY_LOG (tests/reliability_log.py).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from absl import flags
from hypothesis import HealthCheck, given, settings, strategies as st
from ml_collections import config_flags
import pytest

from tests import sharding_worker as worker
from tests.reliability_log import record
from vit_jax import sharding as sharding_lib
from vit_jax.models.vit import REMAT_POLICIES
from vit_jax.train import validate

_QUIET = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST, SLOW = settings(max_examples=60, **_QUIET), settings(max_examples=1500, **_QUIET)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A valid base: quickstart with ViT-testing (width 32, 2 heads, mlp 64, patch 4) at 16 px.
BASE = ['--config.model.name=ViT-testing', '--config.model.patch_size=4', '--config.image_size=16',
        '--config.dataset=digits', '--config.channels=1']
TOTAL, WARMUP, BATCH = 1750, 100, 256  # quickstart's


def parse(*overrides: str):
  """The config `python -m vit_jax.main --config=configs/quickstart.py ...` would get."""
  argv = ['main', f'--config={ROOT}/configs/quickstart.py', *BASE, *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def integer(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def model_int(ok):
  return lambda v: v is None or (integer(v) and v > 0 and ok(v))  # None: the registry's value


# What a valid value of each key is, stated independently of validate.py.
VALID = {
    'batch_size': lambda v: integer(v) and v > 0,
    'total_steps': lambda v: integer(v) and v >= WARMUP,
    'warmup_steps': lambda v: integer(v) and 0 <= v <= TOTAL,
    'accum_steps': lambda v: integer(v) and v > 0 and BATCH % v == 0,
    'channels': lambda v: v in (1, 3),
    'image_size': lambda v: integer(v) and v > 0 and v % 4 == 0,
    'base_lr': lambda v: number(v) and v > 0,
    **{k: lambda v: number(v) and v >= 0 for k in (
        'end_lr', 'grad_clip_norm', 'weight_decay', 'mixup', 'cutmix')},
    **{k: lambda v: number(v) and 0 <= v < 1 for k in (
        'label_smoothing', 'ema_decay', 'held_out', 'b1', 'b2', 'momentum')},
    **{k: lambda v: integer(v) and v >= 0 for k in (
        'eval_every', 'checkpoint_every', 'log_every', 'workers', 'prefetch', 'keep_every',
        'eval_batch_size', 'fsdp_min_size', 'seed', 'cpu_devices')},
    'keep_last': lambda v: integer(v) and v >= 1,
    'model.patch_size': lambda v: v is None or (integer(v) and v > 0 and 16 % v == 0) or (
        isinstance(v, tuple) and len(v) == 2 and all(integer(p) and p > 0 and 16 % p == 0
                                                     for p in v)),
    'model.hidden_size': model_int(lambda v: v % 2 == 0),  # 2 heads
    'model.num_heads': model_int(lambda v: 32 % v == 0),   # width 32
    'model.num_layers': model_int(lambda v: True),
    'model.mlp_dim': model_int(lambda v: True),
    'model.dropout_rate': lambda v: v is None or (number(v) and 0 <= v < 1),
    'model.remat': lambda v: v is None or isinstance(v, bool) or (isinstance(v, str) and
                                                              v in REMAT_POLICIES),
}
RAW = st.one_of(
    st.integers(-3, 40).map(str), st.integers(-10 ** 12, 10 ** 12).map(str),
    st.sampled_from(['0.0', '0.5', '-0.5', '0.999', '1.0', '1.5', '2.5', '1e-3', '-1e-9', 'nan',
                     '-nan', 'inf', '-inf', 'abc', '', 'True', 'False', 'None', '(4, 4)',
                     '(2, 3)', '(4,)', '[1]', '0x10', '1_000', 'dots_saveable', 'full']))


def _check_value(key: str, raw: str) -> None:
  try:
    config = parse(f'--config.{key}={raw}')
  except flags.Error as e:  # a type the key cannot hold: refused by the flag parser, naming it
    assert f'--config.{key}=' in str(e), e
    record('configs', f'type/{key}', 'error')
    return
  value = config
  for part in key.split('.'):
    value = value[part]
  if VALID[key](value):
    validate.validate(config)  # must be accepted
    record('configs', f'valid/{key}', 'read')
    return
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(config)
  assert key.split('.')[-1] in str(e.value), (key, raw, e.value)
  record('configs', f'range/{key}', 'error')


@FAST
@given(st.sampled_from(sorted(VALID)), RAW)
def test_any_value_of_any_key_is_accepted_if_valid_else_refused_naming_it(key, raw):
  _check_value(key, raw)


@pytest.mark.parametrize('raw', ['dots_saveable', 'nothing_saveable', 'full', 'True', 'False',
                                 'dots', '', '3', '(1, 2)', '[1]'])
def test_remat_takes_a_flag_or_a_policy_name(raw):
  """`--config.model.remat=dots_saveable` (the README's advice for deep models) is accepted; a
  misspelt policy is refused before anything starts, naming the policies."""
  _check_value('model.remat', raw)


@pytest.mark.slow
@SLOW
@given(st.sampled_from(sorted(VALID)), RAW)
def test_any_value_of_any_key_is_accepted_if_valid_else_refused_naming_it_many(key, raw):
  _check_value(key, raw)


@pytest.mark.parametrize('key', sorted(VALID))
def test_every_key_refuses_a_negative_and_a_nan(key):
  """Deterministic floor under the fuzzing: every key meets at least these two."""
  for raw in ('-1', 'nan'):
    _check_value(key, raw)


# Swin-testing: patch 2, 2 stages, window 4.
SWIN = ['--config.model.name=Swin-testing', '--config.model.classifier=None',
        '--config.model.posemb=None', '--config.model.patch_size=None']


@pytest.mark.parametrize('overrides,refusal', [
    (['--config.image_size=18'], 'multiple of the patch size'),                       # ViT, patch 4
    (['--config.model.patch_size=(4, 3)'], 'multiple of the patch size'),
    ([*SWIN, '--config.image_size=33'], 'multiples of the patch size'),
    ([*SWIN, '--config.image_size=30'], None),  # a 15x15 map: merging pads it to 16x16, as timm
    ([*SWIN, '--config.image_size=32', '--config.model.window_size=0'], 'window_size'),
    ([*SWIN, '--config.image_size=36'], None),  # window 4 does not divide the 18x18 map: padded
    ([*SWIN, '--config.image_size=32', '--config.model.window_size=(4, 3)'], None),   # as timm
])
def test_image_sizes_the_patch_does_not_divide_are_refused(overrides, refusal):
  config = parse(*overrides)
  if refusal is None:
    validate.validate(config)
    record('configs', 'image-size/window-padded', 'read')
    return
  with pytest.raises(validate.ConfigError, match=re.escape(refusal)):
    validate.validate(config)
  record('configs', 'image-size/' + refusal.split()[0], 'error')


# ---------------------------------------------------------------------------- against devices

AXIS = st.sampled_from(list(sharding_lib.AXES) + ['model', 'x'])
SIZE = st.one_of(st.integers(-2, 5), st.sampled_from([2.5, 1.0, True]))
MESH = st.one_of(
    st.lists(st.tuples(AXIS, SIZE), min_size=1, max_size=3),  # anything
    st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2])).map(  # mostly fits
        lambda ft: [('data', -1), ('fsdp', ft[0]), ('tensor', ft[1])]))


def mesh_fits(mesh, devices: int) -> dict | None:
  """Axis sizes of a valid mesh on `devices`, or None; independent of sharding.py."""
  names, sizes = [n for n, _ in mesh], [s for _, s in mesh]
  if (len(set(names)) != len(names) or any(n not in ('data', 'fsdp', 'tensor') for n in names)
      or not all(integer(s) and (s >= 1 or s == -1) for s in sizes) or sizes.count(-1) > 1):
    return None
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices % known:
      return None
    sizes[sizes.index(-1)] = devices // known
  return dict(zip(names, sizes)) if math.prod(sizes) == devices else None


def _check_devices(mesh, devices, processes, batch, accum, eval_bs) -> None:
  config = parse(f'--config.mesh={tuple(mesh)!r}', f'--config.batch_size={batch}',
                 f'--config.accum_steps={accum}', f'--config.eval_batch_size={eval_bs}',
                 '--config.warmup_steps=1')
  shape = mesh_fits(mesh, devices)
  problems = {'accum_steps'} if batch % accum else set()
  if shape is None:
    problems.add('mesh')
  else:
    split = math.lcm(shape.get('data', 1) * shape.get('fsdp', 1), processes)
    if not problems and (batch // accum) % split:
      problems.add('batch_size')
    if (eval_bs or batch) % split:
      problems.add('eval_batch_size')
  try:
    validate.validate(config)
    validate.check_devices(config, devices, processes)
  except validate.ConfigError as e:
    named = set(re.findall(r'\b(mesh|eval_batch_size|batch_size|accum_steps)\b', str(e)))
    assert named & problems, (problems, str(e))  # names (one of) what is actually wrong
    record('configs', 'devices/' + '+'.join(sorted(named & problems)), 'error')
    return
  assert not problems, (problems, mesh, devices, processes)
  record('configs', 'devices/valid', 'read')


DEVICE_CASES = dict(mesh=MESH, devices=st.sampled_from([1, 2, 3, 4, 6, 8, 16]),
                    processes=st.sampled_from([1, 2, 4]),
                    batch=st.one_of(st.integers(1, 64), st.sampled_from([16, 32, 64])),
                    accum=st.sampled_from([1, 2, 4]), eval_bs=st.sampled_from([0, 8, 12, 30]))


@pytest.mark.parametrize('mesh,devices,processes,batch,accum,eval_bs', [
    ([('data', 3)], 2, 1, 16, 1, 0),                     # needs 3 devices
    ([('data', 2), ('data', 1)], 2, 1, 16, 1, 0),        # an axis twice
    ([('data', 2.5)], 2, 1, 16, 1, 0),                   # not an integer
    ([('data', -1), ('fsdp', 2)], 4, 1, 6, 1, 8),        # 6 over 4 devices
    ([('data', -1)], 3, 3, 4, 1, 0),                     # 4 over 3 processes
    ([('data', -1)], 4, 1, 16, 4, 8),                    # micro-batch 4: fine
    ([('data', -1)], 4, 1, 16, 1, 6),                    # eval 6 over 4 devices
    ([('data', -1), ('tensor', 2)], 8, 2, 16, 2, 12),    # fine: tensor does not split batches
])
def test_device_checks_name_what_does_not_fit(mesh, devices, processes, batch, accum, eval_bs):
  _check_devices(mesh, devices, processes, batch, accum, eval_bs)


@FAST
@given(**DEVICE_CASES)
def test_mesh_and_batch_against_the_devices(mesh, devices, processes, batch, accum, eval_bs):
  _check_devices(mesh, devices, processes, batch, accum, eval_bs)


@pytest.mark.slow
@SLOW
@given(**DEVICE_CASES)
def test_mesh_and_batch_against_the_devices_many(mesh, devices, processes, batch, accum, eval_bs):
  _check_devices(mesh, devices, processes, batch, accum, eval_bs)


@pytest.mark.parametrize('override,message', [
    ("--config.mesh=(('data', 3),)", "config error: mesh: mesh {'data': 3} needs 3 devices"),
    pytest.param('--config.batch_size=33', 'config error: batch_size 33 / accum_steps 1 = 33 '
                 'must be a multiple of 2', marks=pytest.mark.slow),  # the same wiring again
])
def test_main_refuses_before_compiling_or_writing(tmp_path, override, message):
  env = worker.worker_env(JAX_LOG_COMPILES='1')
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "w"}',
       '--config=configs/quickstart.py', *BASE, '--config.cpu_devices=2', override],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode != 0 and message in out.stderr, out.stderr[-3000:]
  assert 'Compiling' not in out.stderr and not (tmp_path / 'w').exists()
  record('configs', f'main/{override.split("=")[0][9:]}', 'error')
