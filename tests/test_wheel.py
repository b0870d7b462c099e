"""The wheel, tested from outside the checkout: built from a copy of the repository, installed with
its console script into a new virtual environment whose sys.path has no checkout, and run from
another directory: `vit-jax summary`, a 20-step training on digits, `vit-jax predict` on its
workdir, `vit-jax benchmark model` (a worker process) and `vit-jax convert --to timm --verify`
(with the `torch` extra).

Nothing is downloaded. The new environment sees this test environment's packages through a .pth
file (a path line, so their own .pth hooks do not run), and pip installs `vit_jax` and
`vit_jax[torch]` with `--no-index` and no configuration: its resolver must find every declared
dependency (and theirs) among those installed, the versions of requirements*.txt. That proves the
declared ranges admit the lock and resolve; it does not prove that PyPI serves them everywhere.

Every Python process of the new environment records, at exit, its sys.path and the file of every
module it imported (an `import` line in a .pth file). The test fails if a vit_jax module comes
from anywhere but the new environment, if any module or sys.path entry lies in the checkout (but
in this test environment, which CI keeps at .venv inside it), or if `import configs` works.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from tests import interop

pytestmark = pytest.mark.slow
ROOT = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What a build of the checkout never needs (and may be large): run outputs, environments, caches.
IGNORE = shutil.ignore_patterns('.git', '.venv', 'runs', '__pycache__', '*.pyc', 'build', 'dist',
                                '*.egg-info', '.pytest_cache', '.hypothesis', '.whl', '.gl')

AUDIT = '''"""tests/test_wheel.py: at exit, sys.path and the file of every imported module."""
import atexit, json, os, sys


def _dump(out=os.environ.get('VIT_JAX_IMPORT_AUDIT')):
  if not out:
    return
  files = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}
  with open(out, 'a') as f:
    f.write(json.dumps({'argv': sys.argv, 'path': sys.path,
                        'modules': {n: p for n, p in files.items() if isinstance(p, str)}}) + '\\n')


atexit.register(_dump)
'''


def _clean_env(**extra: str) -> dict[str, str]:
  """os.environ without anything that points Python or pip elsewhere (PYTHONPATH: the checkout;
  PIP_*: indexes, find-links and constraints), plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('PIP_') and k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP',
                                                   'PYTHONUSERBASE', 'VIRTUAL_ENV')}
  env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK='1', **extra)
  return env


def _run(cmd: list[str], cwd, env, timeout: int = 600) -> subprocess.CompletedProcess:
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
  assert out.returncode == 0, (f'{" ".join(map(str, cmd))} exited with {out.returncode}:\n'
                               f'{out.stdout[-2000:]}\n{out.stderr[-4000:]}')
  return out


def _under(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder + os.sep)


def _build_wheel(tmp) -> str:
  src, dist = tmp / 'src', tmp / 'dist'
  shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORE)
  try:
    import setuptools  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.fail('building the wheel needs setuptools>=70.1 in this environment '
                '(requirements-dev.txt)')
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
        '-w', str(dist), str(src)], tmp, _clean_env())
  wheels = sorted(dist.glob('vit_jax-*.whl'))
  assert len(wheels) == 1, wheels
  return str(wheels[0])


def _check_wheel_contents(wheel: str) -> None:
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    info = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    entry_points = z.read(info).decode()
    metadata = z.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
  tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}
  assert tops == {'vit_jax'}, f'top-level names besides vit_jax: {tops}'
  for recipe in ('common', 'pretrain', 'finetune', 'quickstart', 'quickstart_digits',
                 'fashion_mnist', 'distill_fashion_mnist'):
    assert f'vit_jax/configs/{recipe}.py' in names
  assert 'vit_jax/convert/torchvision_stub/torchvision/__init__.py' in names
  assert re.search(r'^vit-jax = vit_jax\.commands:entry$', entry_points, re.M)
  requires = re.findall(r'^Requires-Dist: (.*)$', metadata, re.M)
  assert any(r.startswith('jax') for r in requires)
  assert any('extra == "torch"' in r for r in requires)


def _new_venv(tmp) -> tuple[str, str]:
  """(python, site-packages) of a new venv without pip that sees this environment's packages."""
  venv = tmp / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], tmp, _clean_env())
  python = str(venv / 'bin' / 'python')
  purelib = _run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], tmp,
                 _clean_env()).stdout.strip()
  ours = [p for p in site.getsitepackages() if os.path.isdir(p)]
  with open(os.path.join(purelib, '_vit_jax_test_deps.pth'), 'w') as f:
    f.write('\n'.join(ours) + '\n')
  with open(os.path.join(purelib, '_vit_jax_import_audit.py'), 'w') as f:
    f.write(AUDIT)
  with open(os.path.join(purelib, '_vit_jax_import_audit.pth'), 'w') as f:
    f.write('import _vit_jax_import_audit\n')
  return python, purelib


def _pip_install(python: str, wheel: str, requirement: str, tmp) -> float:
  """Installs `requirement` from the wheel's folder only; returns the seconds it took."""
  t0 = time.perf_counter()
  _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-index', '--find-links',
        os.path.dirname(wheel), requirement], tmp, _clean_env())
  return time.perf_counter() - t0


def _audit(path: str, purelib: str, seen: int, processes: int = 1) -> int:
  """Checks the records the new environment's processes appended since `seen` (at least
  `processes` of them); returns the count so far."""
  with open(path) as f:
    records = [json.loads(line) for line in f][seen:]
  assert len(records) >= processes, (
      f'{len(records)} processes recorded their imports, expected {processes}')
  mine = os.path.realpath(sys.prefix)  # this test environment (CI: .venv in the checkout)
  for r in records:
    what = ' '.join(r['argv'])
    for name, file in r['modules'].items():
      if not os.path.isabs(file):  # e.g. torch.ops: '_ops.py', no file of its own
        continue
      if name == 'vit_jax' or name.startswith('vit_jax.'):
        assert _under(file, purelib), f'{what}: {name} imported from {file}, not the new venv'
      assert not (_under(file, ROOT) and not _under(file, mine)), (
          f'{what}: {name} imported from the checkout ({file})')
    assert 'configs' not in r['modules'] and 'tests' not in r['modules'], what
    for entry in r['path']:
      assert not (os.path.isabs(entry) and _under(entry, ROOT) and not _under(entry, mine)), (
          f'{what}: the checkout is on sys.path ({entry})')
  return seen + len(records)


def _digit_png(path) -> int:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  Image.fromarray((digits.images[0] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(path)
  return int(digits.target[0])


def test_the_wheel_installs_and_runs_from_outside_the_checkout(tmp_path):
  wheel = _build_wheel(tmp_path)
  _check_wheel_contents(wheel)
  python, purelib = _new_venv(tmp_path)
  seconds = _pip_install(python, wheel, 'vit_jax', tmp_path)
  print(f'wheel {os.path.getsize(wheel) / 1024:.0f} KiB; installed in {seconds:.1f}s')
  checks = subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'check'], cwd=tmp_path,
                          env=_clean_env(), capture_output=True, text=True, timeout=300,
                          check=False)
  # timm's missing torchvision is this environment's own (timm is installed without it).
  assert not re.search(r'vit[-_]jax', checks.stdout + checks.stderr, re.I), checks.stdout

  work = tmp_path / 'elsewhere'  # a directory with no checkout in it or above it
  work.mkdir()
  bindir = os.path.dirname(python)
  audit = str(tmp_path / 'imports.jsonl')
  env = _clean_env(PATH=bindir + os.pathsep + os.environ.get('PATH', ''),
                   VIT_JAX_IMPORT_AUDIT=audit, JAX_PLATFORMS='cpu')
  vit_jax = os.path.join(bindir, 'vit-jax')
  seen = 0

  out = _run([python, '-c', 'import vit_jax, vit_jax.configs as c; print(vit_jax.__file__); '
              'print(c.path("quickstart"))'], work, env)
  assert all(_under(line, purelib) for line in out.stdout.split())
  out = subprocess.run([python, '-c', 'import configs'], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode != 0 and "No module named 'configs'" in out.stderr
  seen = _audit(audit, purelib, seen)

  out = _run([vit_jax, 'summary', '--model', 'ViT-B_16'], work, env)
  assert out.stdout.strip().splitlines()[-1] == 'params: 86567656'  # ViT-B/16, 1000 classes
  seen = _audit(audit, purelib, seen)

  # 20 steps on digits, the recipe by name with its argument, a tiny model at 16x16.
  out = _run([vit_jax, 'train', '--config=quickstart_digits:model=ViT-testing', '--workdir=run',
              '--config.image_size=16', '--config.total_steps=20', '--config.warmup_steps=2',
              '--config.eval_every=20', '--config.checkpoint_every=20', '--config.log_every=10',
              '--config.progress=False'], work, env)
  result = json.loads(out.stdout.strip().splitlines()[-1].split('result: ', 1)[1])
  assert result['step'] == 20 and result['eval_count'] == 359 and np.isfinite(result['train_loss'])
  assert (work / 'run' / 'checkpoints' / '20').is_dir()
  seen = _audit(audit, purelib, seen)

  _digit_png(work / 'digit.png')
  out = _run([vit_jax, 'predict', '--checkpoint', 'run', 'digit.png'], work, env)
  rows = re.findall(r'^\s+([\d.]+)%\s+\S+', out.stdout, re.M)
  assert len(rows) == 5 and 0 < sum(map(float, rows)) <= 100.01, out.stdout
  seen = _audit(audit, purelib, seen)

  # The benchmark's worker processes start as `python -m vit_jax.benchmark.model` from here too.
  out = _run([vit_jax, 'benchmark', 'model', '--model', 'ViT-testing', '--image_size', '16',
              '--num_classes', '5', '--batch', '2', '--mode', 'train', '--repeats', '1',
              '--seconds', '0.05'], work, env)
  assert re.search(r'^train: [\d.]+ img/s$', out.stdout.strip().splitlines()[-1]), out.stdout
  seen = _audit(audit, purelib, seen, processes=2)  # the command and its worker

  interop.require('torch')
  interop.require('transformers')
  seconds = _pip_install(python, wheel, 'vit_jax[torch]', tmp_path)
  print(f'vit_jax[torch] resolved against the installed torch and transformers in {seconds:.1f}s')
  interop.require_timm()  # timm comes from this environment (its torchvision: see pyproject)
  out = _run([vit_jax, 'convert', '--input', 'run', '--to', 'timm', '--output', 'timm',
              '--verify'], work, env)
  diff = float(re.search(r'largest \|logit difference\| = (\S+)', out.stdout).group(1))
  assert diff <= 1e-4 and (work / 'timm' / 'model.safetensors').is_file()
  _audit(audit, purelib, seen)
