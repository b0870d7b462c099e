"""The trainer end to end: config validation, a real short run, kill-and-resume bitwise equality
(a soak of SIGKILLs in steps, evaluations and saves), SIGTERM preemption and half-written
checkpoints. Runs `python -m vit_jax.main` in subprocesses, as a user would. Non-finite values, a
full disk and a lost process: tests/test_faults.py."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.sharding_worker import worker_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small digits job (8x8 grayscale, 10 classes): fast enough to run many times.
TINY_VALUES = {'model.name': 'ViT-testing', 'model.patch_size': 2, 'dataset': 'digits',
               'image_size': 8, 'channels': 1, 'batch_size': 32, 'warmup_steps': 5,
               'base_lr': 0.003, 'eval_batch_size': 100, 'progress': False, 'augment': 'none'}
TINY = ['--config=configs/quickstart.py:model=ViT-testing'] + [f'--config.{k}={v}' for k, v in TINY_VALUES.items()]


def main_cmd(workdir, *extra):
  return [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *TINY, *extra]


def run_main(workdir, *extra, timeout=300, check=True):
  out = subprocess.run(main_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=_env())
  if check and out.returncode != 0:
    raise AssertionError(f'main failed ({out.returncode}):\n{out.stderr[-4000:]}')
  return out


def _env():
  return worker_env()  # one CPU device, whatever the caller's XLA_FLAGS


def result_of(out):
  line = [l for l in out.stdout.splitlines() if l.startswith('result: ')][-1]
  return json.loads(line[len('result: '):])


def info(path):
  out = subprocess.run([sys.executable, '-m', 'vit_jax.checkpoints', 'info', str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=_env())
  return out


def digest(path):
  out = info(path)
  assert out.returncode == 0, out.stderr
  fields = dict(l.split(': ', 1) for l in out.stdout.splitlines() if l.startswith(('step:', 'sha256:')))
  return int(fields['step']), fields['sha256']


def test_unknown_config_key_is_refused_naming_valid_keys(tmp_path):
  out = run_main(tmp_path / 'w', '--config.bach_size=3', check=False)
  assert out.returncode != 0
  assert "unknown config key 'bach_size'" in out.stderr and 'batch_size' in out.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('override,message', [
    ('--config.warmup_steps=-1', 'warmup_steps'),
    ('--config.model.name=ViT-X_9', 'is not registered'),
    ('--config.optimizer=rmsprop', "'adam' or 'sgd'"),
    ('--config.image_size=9', 'multiple of the patch size'),
    ('--config.cpu_devices=-2', 'cpu_devices must be an integer >= 0'),
])
def test_bad_config_value_is_refused(tmp_path, override, message):
  out = run_main(tmp_path / 'w', override, check=False)
  assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_short_run_learns_and_writes_everything(tmp_path):
  w = tmp_path / 'w'
  out = run_main(w, '--config.total_steps=150', '--config.eval_every=75',
                 '--config.checkpoint_every=75', '--config.log_every=25')
  res = result_of(out)
  assert res['eval_count'] == 180           # digits' held-out 10% (held_out=0.1), each once
  assert res['eval_top1'] > 0.5, res        # chance is 0.1
  rows = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
  for key in ('step', 'loss', 'lr', 'grad_norm', 'img_per_s', 'skipped_images'):
    assert key in rows[0]
  evals = [r for r in rows if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [75, 150]
  assert {'eval_loss', 'eval_top5'} <= set(evals[0])
  assert rows[-1]['loss'] < rows[0]['loss'] * 0.7
  assert any(f.startswith('events') for f in os.listdir(w / 'tensorboard'))
  step, sha = digest(w)
  assert step == 150 and len(sha) == 64
  text = info(w).stdout
  assert '"dataset": "digits"' in text and 'params: ' in text


def test_cpu_devices_splits_the_host_and_trains_the_same(tmp_path):
  args = ('--config.total_steps=20', '--config.eval_every=0', '--config.checkpoint_every=20',
          '--config.log_every=5')
  one = run_main(tmp_path / 'one', *args)
  two = run_main(tmp_path / 'two', *args, '--config.cpu_devices=2')
  assert 'devices: [CpuDevice(id=0), CpuDevice(id=1)]' in two.stderr
  assert 'devices: [CpuDevice(id=0)]' in one.stderr
  losses = [[json.loads(l)['loss'] for l in (tmp_path / w / 'metrics.jsonl').read_text().splitlines()
             if 'loss' in json.loads(l)] for w in ('one', 'two')]
  assert len(losses[0]) == 4
  # Same batches, same mathematics; only the order of the batch-mean reduction differs.
  for a, b in zip(*losses):
    assert abs(a - b) <= 1e-5 * abs(a), losses


def test_compilation_cache_dir_gives_the_next_start_its_compiled_steps(tmp_path):
  """A second run of the same job with the same --config.compilation_cache_dir loads its train step
  from there (JAX logs a persistent-cache hit; the first run had none) and trains identically."""
  cache = tmp_path / 'xla'
  args = ('--config.total_steps=10', '--config.eval_every=0', '--config.checkpoint_every=10',
          '--config.log_every=5', f'--config.compilation_cache_dir={cache}')
  # JAX keeps only programs that took a second to compile by default; these take less. Whatever
  # cache scripts/test.sh set for the suite is not this one.
  env = worker_env(JAX_LOG_COMPILES='1', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  outs = []
  for name in ('first', 'second'):
    out = subprocess.run(main_cmd(tmp_path / name, *args), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    outs.append(out.stderr)
  hit = re.compile(r"Persistent compilation cache hit for '(\w+)'")
  assert not hit.findall(outs[0]) and os.listdir(cache)
  assert any('train_step' in name for name in hit.findall(outs[1])), hit.findall(outs[1])
  rows = [(tmp_path / n / 'metrics.jsonl').read_text() for n in ('first', 'second')]
  assert rows[0].count('"loss"') == 2
  strip = lambda text: [{k: v for k, v in json.loads(l).items() if 'per_s' not in k and 'seconds'
                         not in k} for l in text.splitlines()]
  assert strip(rows[0]) == strip(rows[1])
  from vit_jax.train import validate  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  with config.ignore_type():  # a config built in code can hold anything
    config.compilation_cache_dir = 5
  with pytest.raises(validate.ConfigError, match='compilation_cache_dir must be a directory path'):
    validate.validate(config)


def tiny_config(**overrides):
  from configs import quickstart
  c = quickstart.get_config('model=ViT-testing')
  for key, value in {**TINY_VALUES, **overrides}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_checkpoint_info_errors(tmp_path):
  out = info(tmp_path / 'missing')
  assert out.returncode != 0 and 'does not exist' in out.stderr
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  out = info(tmp_path / 'empty')
  assert out.returncode != 0 and 'no finished checkpoint' in out.stderr


def test_half_written_checkpoint_is_never_loaded(tmp_path):
  w = tmp_path / 'w'
  run_main(w, '--config.total_steps=20', '--config.checkpoint_every=10', '--config.eval_every=0')
  ckpts = w / 'checkpoints'
  # A crash in the middle of saving step 30: orbax's temporary directory, with partial contents.
  tmp = ckpts / '30.orbax-checkpoint-tmp-1234567890'
  shutil.copytree(ckpts / '20', tmp)
  shutil.rmtree(tmp / 'state')
  # And a step directory whose files were truncated (e.g. a copy that died half-way).
  broken = ckpts / '25'
  shutil.copytree(ckpts / '20', broken)
  for root, _, files in os.walk(broken / 'state'):
    for f in files:
      open(os.path.join(root, f), 'wb').close()
  out = run_main(w, '--config.total_steps=24', '--config.checkpoint_every=10',
                 '--config.eval_every=0')
  assert 'resumed from' in out.stderr and 'step 20' in out.stderr
  assert result_of(out)['step'] == 24


class _Phase:
  """What a running `main` is doing, seen from outside: 'save' while orbax's temporary directory of
  an asynchronous save exists, 'eval' between the 'evaluating' log line and the metrics row with
  its results, 'step' once this start has written a metrics row, else 'startup'."""

  def __init__(self, workdir, log_path):
    self.ckpts, self.metrics = workdir / 'checkpoints', workdir / 'metrics.jsonl'
    self.log = log_path
    self.skip = len(self.rows())  # rows of earlier starts

  def rows(self, new_only=False):
    rows = self.metrics.read_text().splitlines() if self.metrics.exists() else []
    return rows[self.skip:] if new_only else rows

  def __call__(self):
    evaluating = self.log.read_text(errors='replace').count('] evaluating\n')  # before the rows
    rows = self.rows(new_only=True)
    if not rows:
      return 'startup'
    if self.ckpts.is_dir() and any('.orbax-checkpoint-tmp' in d for d in os.listdir(self.ckpts)):
      return 'save'
    return 'eval' if evaluating > sum('"eval_top1"' in r for r in rows) else 'step'


@pytest.mark.slow
def test_sigkill_soak_in_steps_evaluation_and_saves_resumes_bitwise(tmp_path):
  """Ten SIGKILLs, each followed by a restart of the same command, end bitwise equal to a run never
  interrupted. In a seeded order, four kills come after a random number (1-15) of this start's
  steps, three at a random moment (0-30 ms) into its first evaluation and three into an
  asynchronous save. The phase each kill hit is observed just before the signal and printed."""
  import random
  from tests.reliability_log import record
  # A save every 7 steps, an evaluation (900 held-out images in batches of 10) every 25, a metrics
  # row every step. Ten rounds advance at most 4 * 15 + 3 * 25 + 3 * 14 < 200 steps.
  args = ['--config.total_steps=200', '--config.checkpoint_every=7', '--config.eval_every=25',
          '--config.log_every=1', '--config.held_out=0.5', '--config.eval_batch_size=10',
          '--config.model.dropout_rate=0.1', '--config.augment=pad_crop_flip']
  ref = tmp_path / 'ref'
  run_main(ref, *args, timeout=900)
  want = digest(ref)
  assert want[0] == 200

  rng = random.Random(14)
  targets = rng.sample(['step'] * 4 + ['eval'] * 3 + ['save'] * 3, 10)
  w = tmp_path / 'killed'
  kills = []  # (round, aimed at, hit, last step logged)
  for i, target in enumerate(targets):
    log_path = tmp_path / f'round{i}.log'
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(main_cmd(w, *args), cwd=ROOT, stdout=log, stderr=log, env=_env())
    try:
      phase, steps, delay = _Phase(w, log_path), rng.randint(1, 15), rng.uniform(0, 0.03)
      deadline = time.time() + 600
      while proc.poll() is None and time.time() < deadline:
        if (len(phase.rows(new_only=True)) >= steps if target == 'step' else phase() == target):
          if target != 'step':
            time.sleep(delay)
          hit = phase()
          if hit == target or target == 'step':
            proc.send_signal(signal.SIGKILL)
            kills.append((i, target, hit, json.loads(phase.rows()[-1])['step']))
            break
          delay = 0.0  # the phase ended first: kill in the next one as soon as it is seen
        time.sleep(0.01)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
    assert len(kills) == i + 1, f'round {i} ({target}): no kill, exit {proc.returncode}: {log_path}'
  print('kills (round, aimed at, hit, last step logged):', kills)
  assert {'step', 'eval', 'save'} <= {k[2] for k in kills}, kills
  assert digest(w)[0] < 200
  run_main(w, *args, timeout=900)
  got = digest(w)
  for i, _, hit, _ in kills:
    record('fault', f'sigkill/{hit}', 'survived' if got == want else 'lost', round=i)
  record('resume', 'sigkill-soak', 'bitwise' if got == want else 'differs')
  assert got == want


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  w = tmp_path / 'w'
  proc = subprocess.Popen(main_cmd(w, '--config.total_steps=100000', '--config.eval_every=0',
                                   '--config.checkpoint_every=0', '--config.log_every=10'),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_env())
  try:
    metrics = w / 'metrics.jsonl'
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('\n') >= 2):
      assert proc.poll() is None and time.time() < deadline, 'training did not start'
      time.sleep(0.5)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.time() - t
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  assert elapsed < 20
  res = result_of(subprocess.CompletedProcess([], 0, stdout, stderr))
  assert res['preempted'] is True
  step, _ = digest(w)
  assert step == res['step'] >= 20


def test_finetune_recipe_loads_a_google_npz_at_a_new_resolution(tmp_path):
  """configs/finetune.py with pretrained=.npz: new head, resampled position embeddings, SGD."""
  import jax
  import numpy as np
  from vit_jax.families import registry
  from vit_jax.checkpoints.npz import write_npz
  from vit_jax.families.registry import create_model
  from vit_jax.models import params as params_lib
  src = create_model(registry.get_model_config('ViT-testing'), 1000, head_zeroinit=False)
  params = src.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))['params']
  npz = tmp_path / 'ViT-testing.npz'   # Google's layout: 1000 classes, a 2x2 patch grid
  write_npz(npz, {k: np.asarray(v) for k, v in params_lib.flatten(params).items()})
  w = tmp_path / 'ft'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={w}',
         f'--config=configs/finetune.py:model=ViT-testing,dataset=digits,pretrained={npz}',
         '--config.image_size=16', '--config.batch_size=32', '--config.total_steps=6',
         '--config.warmup_steps=1', '--config.eval_every=6', '--config.checkpoint_every=6',
         '--config.log_every=3', '--config.eval_batch_size=120', '--config.progress=False']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'reshaped Transformer/posembed_input/pos_embedding: (1, 5, 32) -> (1, 17, 32)' in out.stderr
  assert 'head' in out.stderr and 'added' in out.stderr
  cfg = json.loads((w / 'config.json').read_text())
  assert (cfg['optimizer'], cfg['image_size'], cfg['weight_decay']) == ('sgd', 16, 0.0)
  # The transformer weights are the checkpoint's (SGD moved them only a few steps).
  from vit_jax.checkpoints.manager import load_params
  tuned, _ = load_params(w)
  a = np.asarray(tuned['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'])
  b = np.asarray(params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'])
  assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
  assert tuned['head']['kernel'].shape == (32, 10)


def test_checkpoint_retention_keeps_last_every_nth_and_best(tmp_path):
  import numpy as np
  from vit_jax.checkpoints.manager import CheckpointManager
  m = CheckpointManager(str(tmp_path / 'c'), keep_last=2, keep_every=4, keep_best=True,
                        async_save=False)
  top1 = {3: 0.9, 6: 0.5}   # step 3 is the best evaluation
  for step in range(1, 10):
    metrics = {'eval_top1': top1[step]} if step in top1 else None
    m.save(step, {'w': np.full(3, step, np.float32)}, {'step': step}, {}, metrics)
  m.close()
  assert m.all_steps() == [3, 4, 8, 9]


def test_model_overrides_reach_the_module():
  from vit_jax.train import loop
  c = tiny_config()
  c.model.dropout_rate = 0.2
  c.model.classifier = 'map'
  c.model.representation_size = 0   # 0: no pre-logits layer
  family, m, _ = loop.build_model(c, 7)
  assert family.name == 'vit'
  assert (m.dropout_rate, m.classifier, m.representation_size, m.patch_size) == (0.2, 'map', None, 2)
  assert (m.num_classes, m.hidden_size) == (7, 32)


def test_swin_finetune_moves_to_a_larger_window_and_trains(tmp_path):
  """A Swin run's workdir (window 2 at 16 px) fine-tunes at 32 px with window 4 through
  `python -m vit_jax.main`: every relative-position table resized (bicubic, the family's default),
  a new head, and the run trains (the 224/window-7 -> 384/window-12 transfer, at a tiny size)."""
  import jax
  import numpy as np
  from vit_jax.checkpoints import manager
  from vit_jax.families import registry
  from vit_jax.families.base import Architecture
  fields = dict(registry.get_model_config('Swin-testing'), window_size=2, head_zeroinit=False)
  src = registry.create_model(fields, 1000)
  params = src.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  manager.save_params(str(tmp_path / 'src'), params, {
      'architecture': Architecture(fields, 1000, (16, 16), 3, 'swin').to_meta()})
  w = tmp_path / 'ft'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={w}',
         f'--config=configs/finetune.py:model=Swin-testing,dataset=digits,pretrained={tmp_path / "src"}',
         '--config.image_size=32', '--config.model.window_size=4', '--config.batch_size=32',
         '--config.total_steps=6', '--config.warmup_steps=1', '--config.eval_every=6',
         '--config.checkpoint_every=6', '--config.log_every=3', '--config.eval_batch_size=120',
         '--config.progress=False']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  resized = [l for l in out.stderr.splitlines() if 'reshaped' in l and 'relative_position_bias_table' in l]
  assert len(resized) == sum(fields['depths']), out.stderr[-3000:]  # one table per block
  assert all('(9, ' in l and '-> (49, ' in l for l in resized), resized  # (2*2-1)^2 -> (2*4-1)^2
  assert 'bicubic' in out.stderr
  res = json.loads(out.stdout.strip().splitlines()[-1].split('result: ', 1)[1])
  assert res['step'] == 6 and np.isfinite(res['train_loss'])
  from vit_jax.checkpoints.manager import load_params
  tuned, meta = load_params(w)
  assert meta['architecture']['family'] == 'swin'
  assert meta['architecture']['model_config']['window_size'] == 4
  assert tuned['head']['kernel'].shape[-1] == 10
