"""The training recipes (ml_collections config files), shipped with the package, and how a
`--config` argument names one.

    --config=quickstart                       a recipe by name (any directory, checkout or not)
    --config=quickstart:model=ViT-Mini_4      ... with the recipe's arguments
    --config=configs/quickstart.py            a path; in a checkout, configs/ is this folder
    --config=/path/to/my_recipe.py:key=value  any config file with get_config()

A path that exists is always taken as it is. One that does not exist, of the form `NAME`,
`NAME.py` or `configs/NAME.py`, names the packaged recipe NAME, so the commands of the docs work
from any directory once vit_jax is installed. `names()` lists the recipes, `path(name)` gives a
recipe's file (to copy and edit).

The recipes import `vit_jax.configs.common`; nothing else in vit_jax imports a recipe, and this
module imports none (only the command-line faces call `resolve_argv`).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The recipes' names, sorted (`common` is the base every recipe starts from)."""
  return sorted(f[:-3] for f in os.listdir(HERE)
                if f.endswith('.py') and not f.startswith('_'))


def path(name: str) -> str:
  """The file of the recipe `name` (ValueError naming the recipes when there is none)."""
  if name not in names():
    raise ValueError(f'no recipe named {name!r}; recipes: {", ".join(names())}')
  return os.path.join(HERE, f'{name}.py')


def resolve(spec: str) -> str:
  """'quickstart:model=ViT-Mini_4' -> '/.../vit_jax/configs/quickstart.py:model=ViT-Mini_4'.

  A spec whose file exists is returned unchanged; `NAME`, `NAME.py` and `configs/NAME.py` that do
  not exist name a packaged recipe. Anything else is a ValueError that lists the recipes.
  """
  file, sep, arg = spec.partition(':')
  if os.path.isfile(file):
    return spec
  head, base = os.path.split(os.path.normpath(file)) if file else ('', '')
  name = base[:-3] if base.endswith('.py') else base
  if head in ('', 'configs') and name in names():
    return path(name) + sep + arg
  raise ValueError(f'--config={spec}: {file!r} is neither a config file nor a recipe name. '
                   f'Recipes: {", ".join(names())} (e.g. --config=quickstart or '
                   f'--config=quickstart:model=ViT-Mini_4), or give the path of a .py file that '
                   f'defines get_config()')


def resolve_argv(argv: Sequence[str], flag: str = 'config') -> list[str]:
  """argv with every `--config=SPEC` / `--config SPEC` resolved (`resolve`); other arguments,
  `--config.KEY=VALUE` overrides among them, unchanged."""
  out, argv, i = [], list(argv), 0
  while i < len(argv):
    a = argv[i]
    m = re.fullmatch(rf'--{re.escape(flag)}=(.*)', a, re.DOTALL)
    if m:
      out.append(f'--{flag}={resolve(m.group(1))}')
    elif a == f'--{flag}' and i + 1 < len(argv):
      out += [a, resolve(argv[i + 1])]
      i += 1
    else:
      out.append(a)
    i += 1
  return out
