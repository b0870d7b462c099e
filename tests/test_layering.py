"""The import direction between vit_jax's packages (DESIGN.md), read off the source with `ast`.

Every `import` counts, including those inside functions (a lazy import is still a dependency):
- `vit_jax/models/` imports nothing of vit_jax but models/ (their parameter names are a format).
- `vit_jax/shapes.py` imports nothing of vit_jax; `vit_jax/data/` imports only data/ and shapes.
- `vit_jax/families/` imports only families/, models/ and shapes.
- In families/, the descriptor side (a family's `<family>.py`, `base.py`, `resample.py`) imports no
  interop module (`interop.py`, `*_interop.py`): an interop module depends on its descriptor, never
  the reverse; only `registry.py` pairs the two.
- No module of families/, data/ or shapes imports or reads a private (`_name`) attribute of another
  vit_jax module: what two modules share is a public name of the module that owns it.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'vit_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _in(module: str, package: str) -> bool:
  return module == package or module.startswith(package + '.')


def _is_interop(module: str) -> bool:
  """Whether a module of vit_jax.families is on the interop side."""
  leaf = module.rsplit('.', 1)[-1]
  return _in(module, 'vit_jax.families') and (leaf == 'interop' or leaf.endswith('_interop'))


def imports(module: str) -> Iterator[tuple[int, str, str]]:
  """(line, imported vit_jax module, imported name or '') of every import in `module`'s source.

  `from vit_jax.a import b` yields module 'vit_jax.a.b' when that is a module, else ('vit_jax.a',
  'b'); relative imports are resolved against `module`'s package.
  """
  path = MODULES[module]
  tree = ast.parse(path.read_text(), str(path))
  package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if _in(alias.name, 'vit_jax'):
          yield node.lineno, alias.name, ''
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[:len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      if not _in(base, 'vit_jax'):
        continue
      for alias in node.names:
        full = f'{base}.{alias.name}'
        if full in MODULES:
          yield node.lineno, full, ''
        else:
          yield node.lineno, base, alias.name


def private_uses(module: str) -> Iterator[tuple[int, str, str]]:
  """(line, other module, private name) where `module` imports or reads another vit_jax module's
  `_name` (dunder names excepted)."""
  private = lambda name: name.startswith('_') and not name.startswith('__')
  aliases: dict[str, str] = {}  # local name -> the vit_jax module it is bound to
  path = MODULES[module]
  tree = ast.parse(path.read_text(), str(path))
  for line, target, name in imports(module):
    if name and private(name) and target != module:
      yield line, target, name
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and _in(node.module, 'vit_jax'):
      for alias in node.names:
        if f'{node.module}.{alias.name}' in MODULES:
          aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if _in(alias.name, 'vit_jax') and alias.asname:
          aliases[alias.asname] = alias.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and private(node.attr) and aliases[node.value.id] != module):
      yield node.lineno, aliases[node.value.id], node.attr


def _violations(package: str, allowed) -> list[str]:
  out = []
  for module in MODULES:
    if not _in(module, package):
      continue
    for line, target, name in imports(module):
      if not allowed(module, target):
        out.append(f'{MODULES[module].relative_to(ROOT)}:{line} imports {target}'
                   f'{"." + name if name else ""}')
  return out


def test_the_parser_sees_imports_inside_functions():
  found = {target for _, target, _ in imports('vit_jax.families.base')}
  assert 'vit_jax.families.registry' in found  # `Architecture.get_family` imports it lazily
  assert len(MODULES) > 50 and 'vit_jax.families.registry' in MODULES


def test_models_import_nothing_else_of_vit_jax():
  assert _violations('vit_jax.models', lambda m, t: _in(t, 'vit_jax.models')) == []


def test_shapes_and_data_import_no_model_family_or_trainer():
  assert 'vit_jax.shapes' in MODULES
  assert _violations('vit_jax.shapes', lambda m, t: False) == []
  allowed = lambda m, t: _in(t, 'vit_jax.data') or t == 'vit_jax.shapes'
  assert _violations('vit_jax.data', allowed) == []


def test_families_import_only_families_models_and_shapes():
  allowed = lambda m, t: any(_in(t, p) for p in ('vit_jax.families', 'vit_jax.models',
                                                 'vit_jax.shapes'))
  assert _violations('vit_jax.families', allowed) == []


def test_descriptors_never_import_interop_modules():
  def allowed(module, target):
    return module == 'vit_jax.families.registry' or _is_interop(module) or not _is_interop(target)
  assert _violations('vit_jax.families', allowed) == []


def test_every_registered_family_has_a_descriptor_and_an_interop_module():
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  for family in registry.families():
    interop = registry.interop(family.name)
    assert interop.family is family
    assert _is_interop(type(interop).__module__), type(interop).__module__
    assert not _is_interop(type(family).__module__), type(family).__module__


@pytest.mark.parametrize('package', ['vit_jax.families', 'vit_jax.data', 'vit_jax.shapes'])
def test_no_private_names_cross_modules(package):
  found = [f'{MODULES[m].relative_to(ROOT)}:{line} uses {target}.{name}'
           for m in MODULES if _in(m, package) for line, target, name in private_uses(m)]
  assert found == []


def test_the_training_path_imports_no_torch():
  """DESIGN.md: nothing imports torch at import time in the training path — also not through
  tensorboardX, whose writer imports it when it can (seconds of every training start)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys, tempfile\n'
          'from vit_jax import main\n'
          'from vit_jax.train import loop, metrics\n'
          'w = metrics.MetricsWriter(tempfile.mkdtemp()); w.write(1, {"loss": 1.0}); w.close()\n'
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'
