"""`scripts/benchmark.py` runs end to end on a tiny model: its modes' outputs have the shape the
README's tables are read from. Speed itself is never asserted (measured in the benchmark only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import bench_loop  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _benchmark(*args: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_model_mode_reports_rates_flops_and_memory(tmp_path):
  path = tmp_path / 'r.json'
  stdout = _benchmark('model', '--model', 'ViT-testing', '--image_size', '16', '--num_classes', '5',
                      '--batch', '2', '--repeats', '2', '--seconds', '0.05', '--cpu_devices', '2',
                      '--json_out', str(path))
  assert '2 JAX device(s), data parallel' in stdout
  last = stdout.strip().splitlines()[-2:]
  assert last[0].startswith('infer: ') and last[1].startswith('train: ') and 'img/s' in last[1]
  result = json.loads(path.read_text())
  for task, factor in (('infer', 1), ('train', 3)):
    info = result['tasks'][task]['info']
    assert len(result['tasks'][task]['windows']['ours']) == 2
    assert result['tasks'][task]['rates']['ours'] > 0
    assert info['peak_bytes'] > 0 and info['matmul_peak'] > 1e9
    assert info['devices'] == 2  # the CPU split as --config.cpu_devices=2 trains
    # Analytic FLOPs: the forward's MACs x 2, x 3 more for a training step.
    assert info['flops_per_image'] == pytest.approx(
        factor * result['tasks']['infer']['info']['flops_per_image'])


# Inductor compiles C++ for the peer (31 s of the worker's start alone): the test took 338 s on the
# 2-core machine under a load average of ~20.
@pytest.mark.slow
def test_model_mode_names_the_cpu_and_times_compiled_peers_apart(tmp_path):
  """A torch.compile peer runs (its compile time reported apart, not in a window), and the output
  names the CPU and its measured matmul peaks, in the text and the JSON."""
  pytest.importorskip('torch')
  from vit_jax import runtime  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'r.json'
  stdout = _benchmark('model', '--model', 'ViT-testing', '--image_size', '16', '--num_classes', '5',
                      '--batch', '2', '--repeats', '2', '--seconds', '0.05', '--mode', 'infer',
                      '--compare', 'timm-compile', '--json_out', str(path))
  cpu = runtime.describe_cpu()
  assert f'host: {cpu}; float32 matmul peak ' in stdout and '(numpy)' in stdout
  assert 'GFLOP/s (JAX)' in stdout
  assert 'infer: torch.compile, first call (compiles; outside the timed windows): timm-compile ' in (
      stdout)
  result = json.loads(path.read_text())
  assert result['host']['cpu'] == cpu and result['host']['cores'] >= 1
  assert set(result['host']['matmul_peak_flops']) == {'numpy', 'JAX'}
  assert min(result['host']['matmul_peak_flops'].values()) > 1e9
  task = result['tasks']['infer']
  assert set(task['rates']) == {'ours', 'timm-compile'} and task['rates']['timm-compile'] > 0
  assert len(task['windows']['timm-compile']) == 2 and task['compile_s']['timm-compile'] > 0
  assert stdout.strip().splitlines()[-1].startswith('infer: ') and 'timm-compile' in (
      stdout.strip().splitlines()[-1])


def test_model_mode_refuses_an_unknown_peer():
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), 'model',
                        '--model', 'ViT-testing', '--compare', 'timm,torchscript'],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                       cwd=ROOT, timeout=300, check=False)
  assert out.returncode != 0 and 'timm-compile' in out.stderr and 'torchscript' in out.stderr


def test_tokens_mode_writes_points_and_a_plot(tmp_path):
  stdout = _benchmark('tokens', '--model', 'ViT-testing', '--sizes', '16,32', '--batch', '2',
                      '--variants', 'plain,fused+remat', '--jobs', '2', '--time', '--out',
                      str(tmp_path))
  assert 'tokens: 4 points' in stdout
  points = json.loads((tmp_path / 'tokens.json').read_text())
  assert sorted((p['variant'], p['tokens']) for p in points) == [
      ('fused+remat', 16), ('fused+remat', 64), ('plain', 16), ('plain', 64)]
  for variant in ('plain', 'fused+remat'):
    small, big = sorted((p for p in points if p['variant'] == variant), key=lambda p: p['tokens'])
    assert big['peak_bytes'] > small['peak_bytes'] and big['step_s'] > 0
  assert (tmp_path / 'tokens.png').stat().st_size > 10_000


def test_loop_mode_times_the_model_the_run_trained(tmp_path):
  """`benchmark.py loop` reads the run's model back from its workdir (config.json, checkpoint)."""
  (tmp_path / 'config.json').write_text(json.dumps({
      'model': {'name': 'ViT-Mini_7', 'classifier': 'gap', 'posemb': 'sincos2d', 'scan': None},
      'batch_size': 256, 'optimizer': 'adam', 'dtype': 'auto', 'cpu_devices': 2}))
  meta = tmp_path / 'checkpoints' / '400' / 'meta'
  meta.mkdir(parents=True)
  (tmp_path / 'checkpoints' / '50').mkdir()
  (meta / 'metadata').write_text(json.dumps({'architecture': {
      'num_classes': 10, 'image_size': [28, 28], 'channels': 1}}))
  spec = bench_loop._bare_spec(str(tmp_path))  # pylint: disable=protected-access
  assert spec == dict(model='ViT-Mini_7', batch=256, image_size=28, channels=1, num_classes=10,
                      optimizer='adam', dtype='auto', cpu_devices=2,
                      set=["classifier='gap'", "posemb='sincos2d'"])
