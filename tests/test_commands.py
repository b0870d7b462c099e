"""`vit-jax COMMAND` (vit_jax/commands.py): the listing, unknown commands, each command's --help in
the one CLI convention under its `vit-jax` name, and a command run through it. The installed console
script itself is exercised in tests/test_wheel.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vit_jax import cli, commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGPARSE_COMMANDS = [name for name in commands.COMMANDS if name != 'train']


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
  """Dispatching renames a module's command (cli.COMMAND_NAMES) and sets sys.argv: undo both."""
  monkeypatch.setattr(cli, 'COMMAND_NAMES', {})
  monkeypatch.setattr(sys, 'argv', list(sys.argv))


def test_help_lists_every_command_with_one_line(capsys):
  assert commands.main(['--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: vit-jax COMMAND')
  block = out.split('commands:\n', 1)[1].split('\n\n', 1)[0]
  listed = [line.split()[0] for line in block.splitlines()]
  assert listed == ['train', 'predict', 'convert', 'summary', 'checkpoints', 'inspect', 'fewshot',
                    'plan', 'benchmark']
  for line in out.splitlines():
    assert len(line) <= 100 or line.startswith('recipes')
  assert 'quickstart_digits' in out  # the recipes --config=NAME takes


@pytest.mark.parametrize('argv', [['frobnicate', '--help'], ['--model', 'ViT-B_16'], []])
def test_an_unknown_or_missing_command_is_a_usage_error(argv, capsys):
  assert commands.main(argv) == 2
  err = capsys.readouterr().err
  if argv:
    assert f'unknown command {argv[0]!r}' in err and 'summary' in err
  else:
    assert 'usage: vit-jax COMMAND' in err


@pytest.mark.parametrize('name', ARGPARSE_COMMANDS)
def test_each_command_help_names_it_as_vit_jax(name, capsys):
  with pytest.raises(SystemExit) as e:
    commands.main([name, '--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f'usage: vit-jax {name} ')
  assert f'python -m {commands.COMMANDS[name].shown} ' not in out  # examples renamed too
  assert '-h, --help' in out


def test_a_bad_flag_exits_2_with_the_command_name(capsys):
  with pytest.raises(SystemExit) as e:
    commands.main(['predict', '--no_such_flag'])
  assert e.value.code == 2
  assert 'vit-jax predict: error:' in capsys.readouterr().err


def test_the_module_form_keeps_its_own_name(capsys):
  from vit_jax import summary  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    summary.main(['--help'])
  assert capsys.readouterr().out.startswith('usage: python -m vit_jax.summary ')


def test_a_command_runs_through_the_dispatcher(capsys):
  assert commands.main(['summary', '--model', 'ViT-testing', '--num_classes', '10',
                        '--image_size', '16']) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('params: ')
  assert commands.main(['summary', '--model', 'ViT-nope']) == 2  # the convention's usage error


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_train_help_is_absl_with_the_recipe_flags(flag):
  """absl's --help exits with 1 (`python -m vit_jax.main --help` still does); `vit-jax train`
  exits with 0 and takes -h, as the other commands."""
  out = subprocess.run([sys.executable, '-m', 'vit_jax', 'train', flag], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'vit-jax train --config=RECIPE[:ARGS] --workdir=DIR' in out.stdout
  assert '--config: training recipe' in out.stdout and '--workdir:' in out.stdout
