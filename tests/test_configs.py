"""`vit_jax.configs`: the recipes ship inside the package and a `--config` argument names one by
name, name:args or path, from any directory; the trainer and the planner resolve it the same way."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from vit_jax import configs
from vit_jax.train import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = os.path.dirname(os.path.abspath(configs.__file__))
RECIPES = ('common', 'distill_fashion_mnist', 'fashion_mnist', 'finetune', 'pretrain',
           'quickstart', 'quickstart_digits')


def test_names_are_the_packaged_recipes():
  names = configs.names()
  assert set(RECIPES) <= set(names) and '__init__' not in names
  assert names == sorted(names)
  for name in names:
    assert configs.path(name) == os.path.join(PACKAGED, f'{name}.py')
    assert os.path.isfile(configs.path(name))


def test_the_checkout_folder_is_the_package_folder():
  """configs/ in a checkout is the packaged folder itself: one copy of every recipe."""
  assert os.path.realpath(os.path.join(ROOT, 'configs')) == os.path.realpath(PACKAGED)


@pytest.mark.parametrize('spec', ['quickstart', 'quickstart.py', 'configs/quickstart.py'])
def test_a_name_resolves_to_the_packaged_recipe_from_any_directory(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  assert configs.resolve(spec) == configs.path('quickstart')
  want = configs.path('quickstart') + ':model=ViT-Mini_4'
  assert configs.resolve(f'{spec}:model=ViT-Mini_4') == want


def test_an_existing_path_is_taken_as_it_is(tmp_path, monkeypatch):
  own = tmp_path / 'quickstart.py'  # a user's own file of a recipe's name wins over the recipe
  own.write_text('def get_config(arg=None):\n  raise NotImplementedError\n')
  monkeypatch.chdir(tmp_path)
  assert configs.resolve('quickstart.py:model=X') == 'quickstart.py:model=X'
  assert configs.resolve(f'{own}') == str(own)
  monkeypatch.chdir(ROOT)  # the checkout's relative path, as scripts and docs write it
  spec = 'configs/finetune.py:dataset=cifar100'
  assert configs.resolve(spec) == spec


@pytest.mark.parametrize('spec', ['quickstrat', 'elsewhere/quickstart.py', 'configs/nope.py:x=1',
                                  ''])
def test_an_unknown_name_lists_the_recipes(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match='neither a config file nor a recipe name') as e:
    configs.resolve(spec)
  assert all(name in str(e.value) for name in RECIPES)
  with pytest.raises(ValueError, match='no recipe named'):
    configs.path('quickstrat')


def test_resolve_argv_rewrites_only_the_config_argument(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ['--workdir=w', '--config=pretrain:model=ViT-Ti_16', '--config.batch_size=8', '--config',
          'finetune', '--other', 'quickstart']
  assert configs.resolve_argv(argv) == [
      '--workdir=w', f'--config={configs.path("pretrain")}:model=ViT-Ti_16',
      '--config.batch_size=8', '--config', configs.path('finetune'), '--other', 'quickstart']


@pytest.mark.parametrize('name', configs.names())
def test_every_recipe_loads_by_name_as_by_path_and_validates(name, monkeypatch):
  monkeypatch.chdir(ROOT)
  by_path = validate.load_config_file(f'configs/{name}.py')
  by_name = validate.load_config_file(configs.resolve(name))
  assert by_name.to_dict() == by_path.to_dict()
  validate.validate(by_name)


@pytest.mark.parametrize('name', configs.names())
def test_no_recipe_imports_the_checkout_only_configs_package(name):
  """`from configs import ...` works in a checkout only (configs/ is a link there); installed,
  a recipe must import `vit_jax.configs`."""
  with open(configs.path(name)) as f:
    source = f.read()
  assert not re.search(r'^\s*(from configs\b|import configs\b)', source, re.M), (
      f'{name}.py imports the top-level configs package: use `from vit_jax.configs import ...`')


def test_recipe_arguments_pass_through_a_name():
  config = validate.load_config_file(configs.resolve('quickstart:model=ViT-Mini_4'))
  assert config.model.name == 'ViT-Mini_4' and config.dataset == 'fashion_mnist'


def _main(tmp_path, *args):
  return subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "w"}',
                         *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        check=False, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))


def test_the_trainer_resolves_names_for_its_key_check_and_refuses_unknown_ones(tmp_path):
  """From a directory without configs/: a name reaches both the key check (which names the
  recipe's keys) and absl's flag; an unknown name stops before anything starts."""
  out = _main(tmp_path, '--config=quickstart:model=ViT-testing', '--config.no_such_key=1')
  assert out.returncode != 0
  assert "config error: unknown config key 'no_such_key'" in out.stderr
  assert 'warmup_steps' in out.stderr  # the recipe's keys, listed
  out = _main(tmp_path, '--config=quickstrat')
  assert out.returncode != 0
  assert 'config error: --config=quickstrat' in out.stderr and 'quickstart_digits' in out.stderr
  assert not (tmp_path / 'w').exists()


def test_the_planner_resolves_names_too(tmp_path, monkeypatch):
  from vit_jax.plan import __main__ as plan_main  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  config = plan_main.load_config(['--config=quickstart:model=ViT-testing', '--config.batch_size=8'])
  assert config.model.name == 'ViT-testing' and config.batch_size == 8
  with pytest.raises(ValueError, match='Recipes: '):
    plan_main.load_config(['--config=nope'])
