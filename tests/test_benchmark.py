"""`scripts/benchmark.py` runs end to end on a tiny model: its modes' outputs have the shape the
README's tables are read from. Speed itself is never asserted (measured in the benchmark only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from vit_jax.benchmark import loop as bench_loop  # noqa: E402


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


def test_the_benchmarked_step_is_the_one_build_training_makes_of_a_valid_config():
  """`vit_jax.benchmark.steps`: a benchmark's config is a training config (it validates), its
  `--set` fields reach the model, and its step is `build_training`'s jitted train step."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vit_jax.benchmark import steps  # pylint: disable=import-outside-toplevel
  from vit_jax.train import build as build_lib, validate  # pylint: disable=import-outside-toplevel
  sets = steps.parse_sets(['num_layers=1', 'attention_impl=explicit', 'remat=True'])
  assert sets == {'num_layers': 1, 'attention_impl': 'explicit', 'remat': True}
  with pytest.raises(ValueError, match='FIELD=VALUE'):
    steps.parse_sets(['num_layers'])
  with pytest.raises(ValueError, match='not a model field'):
    steps.bench_config('ViT-testing', image_size=8, channels=1, batch=4, fields={'depth': 2})
  config = steps.bench_config('ViT-testing', image_size=8, channels=1, batch=4, optimizer='adam',
                              fields=sets)
  validate.validate(config)
  assert (config.optimizer, config.weight_decay, config.grad_clip_norm) == ('adam', 0.1, 1.0)
  built = steps.build(config, 5)
  assert isinstance(built, build_lib.Training) and built.fields['num_layers'] == 1
  state = steps.live_state(built)
  before = jax.tree.map(np.array, state.params)  # copies: the step donates the state
  batch = steps.random_batch(built)
  assert batch['image'].shape == (4, 8, 8, 1) and batch['labels'].shape == (4, 5)
  np.testing.assert_array_equal(np.asarray(batch['labels']).sum(-1), 1.0)
  losses = []
  for _ in range(4):
    state, metrics = built.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 4 and losses[-1] < losses[0]  # it trains (on one batch, lr 1e-3)
  assert np.any(before['head']['kernel'] != np.asarray(state.params['head']['kernel']))
