"""`vit-jax COMMAND [ARGS]`: the one console command of the installed package (`python -m vit_jax`
is the same). Each command is a module's command-line face, run with ARGS as if it were started as
`python -m MODULE ARGS`; those module forms keep working. `vit-jax COMMAND --help` prints the
command's flags (vit_jax/cli.py's convention; `train` takes the recipe's flags, absl-style).
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional, Sequence

PROG = 'vit-jax'


class Command(NamedTuple):
  module: str       # imported only when the command runs (most of them import JAX)
  shown: str        # the module as its usage line names it: `python -m <shown>`
  summary: str      # one line for `vit-jax --help`


COMMANDS: dict[str, Command] = {
    'train': Command('vit_jax.main', 'vit_jax.main',
                     'train or fine-tune a model from a recipe: --config=quickstart --workdir=DIR'),
    'predict': Command('vit_jax.predict', 'vit_jax.predict',
                       'classify images with a run, or a Google .npz / timm / Hugging Face model'),
    'convert': Command('vit_jax.convert.__main__', 'vit_jax.convert',
                       'export a checkpoint to timm, Hugging Face, .npz or orbax; --verify'),
    'summary': Command('vit_jax.summary', 'vit_jax.summary',
                       "a registered model's layers, parameters and FLOPs (--model list)"),
    'checkpoints': Command('vit_jax.checkpoints.__main__', 'vit_jax.checkpoints',
                           "a run's checkpoint: config, step, parameter count and digest"),
    'inspect': Command('vit_jax.inspect', 'vit_jax.inspect',
                       'attention rollout, attention distance and position-embedding figures'),
    'fewshot': Command('vit_jax.fewshot', 'vit_jax.fewshot',
                       "few-shot ridge or k-NN accuracy of a checkpoint's features"),
    'plan': Command('vit_jax.plan.__main__', 'vit_jax.plan',
                    "compile a recipe's train step for a topology: memory, FLOPs, does it fit"),
    'benchmark': Command('vit_jax.benchmark.__main__', 'vit_jax.benchmark',
                         'throughput: data, train step, model vs timm / HF, loop, tokens'),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f'usage: {PROG} COMMAND [ARGS...]   ({PROG} COMMAND --help: its flags)', '',
           'Train, fine-tune, convert and inspect Vision Transformers with JAX.', '', 'commands:']
  lines += [f'  {name:{width}s}  {c.summary}' for name, c in COMMANDS.items()]
  from vit_jax import configs  # pylint: disable=import-outside-toplevel  (lists files only)
  lines += ['', 'recipes (train --config=NAME[:ARGS], or a config file): '
            + ', '.join(configs.names()),
            '', f'e.g.  {PROG} train --config=quickstart --workdir=runs/quickstart',
            f'      {PROG} predict --checkpoint runs/quickstart IMAGE.png']
  return '\n'.join(lines)


def _version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version('vit_jax')
  except metadata.PackageNotFoundError:
    return 'unknown (not installed: run from a checkout)'


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs `vit-jax ARGV`; returns the exit status (0 ok, 2 bad usage, else the command's)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage(), file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  if argv[0] == '--version':
    print(f'{PROG} {_version()}')
    return 0
  name, args = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f'{PROG}: error: unknown command {name!r}; one of: {", ".join(COMMANDS)} '
          f'({PROG} --help)', file=sys.stderr)
    return 2
  command = COMMANDS[name]
  from vit_jax import cli  # pylint: disable=import-outside-toplevel
  cli.COMMAND_NAMES[command.shown] = f'{PROG} {name}'
  if name == 'train':
    return _train(command, args)
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(command.module)
  sys.argv = [f'{PROG} {name}', *args]
  status = module.main(args)
  return int(status or 0)


HELP_FLAGS = ('--help', '-?', '--helpshort', '--helpfull')


def _train(command: Command, args: list[str]) -> int:
  """vit_jax.main is an absl program: its flags come from sys.argv, and its --help prints the
  docstring of the __main__ module (this console script's, which has none) and exits with 1;
  here -h is --help too and help exits with 0, as the other commands' (argparse)."""
  import importlib  # pylint: disable=import-outside-toplevel
  args = ['--help' if a == '-h' else a for a in args]
  help_asked = any(a in HELP_FLAGS for a in args)
  module = importlib.import_module(command.module)
  sys.argv = [command.module, *args]  # absl's --help lists the flags of the module argv[0] names
  main_module = sys.modules.get('__main__')
  if main_module is not None and main_module is not module:
    main_module.__doc__ = module.__doc__.replace(f'python -m {command.shown}', f'{PROG} train')
  try:
    module.run()
  except SystemExit as e:  # absl's app.run and the config checks end with sys.exit
    if e.code is None or isinstance(e.code, int):
      return 0 if help_asked else (e.code or 0)
    print(e.code, file=sys.stderr)
    return 1
  return 0


def entry() -> None:
  """The `vit-jax` console script."""
  sys.exit(main())
