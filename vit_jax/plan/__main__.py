"""Compile the real train step of a config for a topology, ahead of time, and say whether it fits.

    python -m vit_jax.plan --config=configs/pretrain.py:model=ViT-L_16 --topology=v5p-64 \
        [--config.key=value ...] [--suggest] [--num_classes N] [--hbm_gib G]

Topologies: cpu:N (N fake CPU devices; this command sets XLA_FLAGS itself), Cloud TPU types
(v4-32, v5e-16, v5p-256, v6e-64, ...) or libtpu shapes (v5e:4x4); TPU ones need libtpu
(`pip install -r requirements-tpu.txt`), never a TPU. Prints memory per chip, FLOPs, collectives,
a roofline step time, and last `fits: yes` / `fits: no`. Exit status: 0 fits, 1 does not fit
(--suggest: nothing fits), 2 bad input. `--suggest` compiles the data x fsdp x tensor meshes, remat
and accumulation settings an analytic screen ranks best and prints those that fit by step time.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

from vit_jax import cli
from vit_jax.plan import topologies as topo_lib

_REEXEC = 'VIT_JAX_PLAN_REEXEC'


def parser():
  p = cli.parser('vit_jax.plan', __doc__)
  p.add_argument('--topology', required=True,
                 help='cpu:N, a Cloud TPU type (v5e-16, v5p-256, v4-32, v6e-64) or a libtpu '
                      'shape (v5e:4x4)')
  p.add_argument('--suggest', action='store_true',
                 help='search meshes, remat and accumulation; print those that fit, fastest first')
  p.add_argument('--num_classes', type=int, default=None,
                 help="the dataset's class count (default: known datasets' or read from it)")
  p.add_argument('--teacher', default=None,
                 help='plan distillation with this registered model as the teacher (shapes only)')
  p.add_argument('--hbm_gib', type=float, default=None, help="override the chip's memory (GiB)")
  p.add_argument('--peak_tflops', type=float, default=None, help="override the bf16 peak")
  p.add_argument('--ici_gbps', type=float, default=None,
                 help='override the ICI bandwidth (GB/s per chip, bidirectional)')
  p.add_argument('--max_compiles', type=int, default=6, help='--suggest: compile at most this many')
  p.add_argument('--top', type=int, default=3, help='--suggest: stop after this many that fit')
  return p


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(--config and --config.* arguments, the others); '--config X' pairs stay together."""
  config, rest, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a == '--config' and i + 1 < len(argv):
      config += [f'--config={argv[i + 1]}']
      i += 2
      continue
    (config if re.match(r'^--config(=|\.)', a) else rest).append(a)
    i += 1
  return config, rest


def load_config(config_args: Sequence[str]):
  """The config file with its --config.key=value overrides, parsed as `vit_jax.main` parses them
  (ml_collections config_flags), then validated."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from vit_jax.train import validate  # pylint: disable=g-import-not-at-top
  from vit_jax import configs  # pylint: disable=g-import-not-at-top
  if not any(a.startswith('--config=') for a in config_args):
    raise ValueError('--config=RECIPE[:ARGS] is required (a recipe name such as pretrain, or '
                     'configs/FILE.py)')
  config_args = configs.resolve_argv(config_args)
  validate.check_overrides(config_args)
  argv = ['vit_jax.plan', *config_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'training config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise ValueError(f'config: {e}') from e
  config = values.config
  validate.validate(config)
  return config


def _prepare_environment(topology: topo_lib.Topology, argv: Sequence[str]) -> None:
  """Fake CPU devices must be requested before JAX starts; TPU topologies compile on the CPU
  backend (no TPU probing). Re-executes this command when JAX was started already."""
  env = dict(os.environ)
  if topology.platform == 'cpu':
    flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
    env['XLA_FLAGS'] = (flags + f' --xla_force_host_platform_device_count={topology.chips}').strip()
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    env.setdefault('JAX_PLATFORMS', 'cpu')
  started = 'jax' in sys.modules and _backends_started()
  if started and env.get(_REEXEC) != '1':
    env[_REEXEC] = '1'
    os.execve(sys.executable, [sys.executable, '-m', 'vit_jax.plan', *argv], env)
  os.environ.update(env)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  config_args, rest = split_config_args(argv)
  args = parser().parse_args(rest)

  def body() -> int:
    topology = topo_lib.parse(args.topology).with_overrides(args.hbm_gib, args.peak_tflops,
                                                            args.ici_gbps)
    if topology.platform == 'tpu' and not topo_lib.libtpu_available():
      raise ImportError(f'topology {topology.name}: {topo_lib.TPU_HINT}')
    _prepare_environment(topology, argv)
    config = load_config(config_args)
    from vit_jax.plan import core  # pylint: disable=g-import-not-at-top
    if args.suggest:
      from vit_jax.plan import suggest  # pylint: disable=g-import-not-at-top
      results = suggest.suggest(config, topology, num_classes=args.num_classes,
                                teacher_model=args.teacher, max_compiles=args.max_compiles,
                                top=args.top, log=lambda s: print(s, flush=True))
      print(suggest.format_table(results, topology), flush=True)
      return 0 if any(p.fits for p in results) else 1
    plan = core.make_plan(config, topology, num_classes=args.num_classes,
                          teacher_model=args.teacher)
    print(core.format_plan(plan), flush=True)
    return 0 if plan.fits else 1

  return cli.run(body)


if __name__ == '__main__':
  cli.main_entry(main)
