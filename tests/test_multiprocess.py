"""Multi-host training on one machine: two real JAX processes of 4 CPU devices each, joined by
`jax.distributed` through a coordinator on 127.0.0.1 and gloo collectives, train exactly as one
process of 8 devices does; and `python -m vit_jax.main` runs in two processes, logs from process 0
only, and writes a checkpoint with every process's shards that a single process restores.

Every subprocess has a timeout, and `sharding_worker.run_all` kills whatever is still running when
a test fails or times out. Tolerances are those of tests/test_sharding.py (see its docstring): the
two layouts run the same partitioned program; only the cross-process all-reduce (gloo) may sum in
another order.
"""
import glob
import json
import os
import sys
import tempfile

import pytest

from tests import sharding_worker as worker

MESHES = ('data8', 'fsdp')


@pytest.fixture(scope='module')
def runs():
  """{'one': {mesh: run}, 'two': {mesh: run}}: 1 process x 8 devices and 2 processes x 4."""
  with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
    coordinator = f'127.0.0.1:{worker.free_port()}'
    cmds = [worker.worker_cmd(one, devices=8, meshes=MESHES)]
    cmds += [worker.worker_cmd(two, devices=4, meshes=MESHES, coordinator=coordinator,
                               num_processes=2, process_id=i) for i in range(2)]
    worker.check_ok(worker.run_all(cmds, timeout=420))
    yield {'one': {m: worker.load_run(one, m) for m in MESHES},
           'two': {m: worker.load_run(two, m) for m in MESHES}}


@pytest.mark.parametrize('mesh', MESHES)
def test_two_processes_train_like_one_process_of_eight_devices(runs, mesh):
  ref, ref_info = runs['one'][mesh]
  arrays, info = runs['two'][mesh]
  assert (ref_info['process_count'], ref_info['device_count']) == (1, 8)
  assert (info['process_count'], info['device_count']) == (2, 8)
  assert info['mesh'] == ref_info['mesh']
  diff = worker.assert_equivalent(ref, arrays, f'2 processes, {mesh}')
  print(f'{mesh}: {diff}')


def test_two_process_fsdp_state_is_sharded_across_all_eight_devices(runs):
  _, info = runs['two']['fsdp']
  path = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'  # [32, 64]
  for prefix in ('params/', 'opt_state/1/mu/', 'opt_state/1/nu/'):
    assert worker.spec_of(info, prefix + path) == (None, 'fsdp')
    assert info['leaves'][prefix + path]['shard_shape'] == [32, 16]


# ---------------------------------------------------------------------------------------------
# The real command line in two processes.

# A small digits job (8x8 grayscale, 10 classes), as in tests/test_train.py; batch sizes divide by 8.
TINY = ['--config=configs/quickstart.py', '--config.model.name=ViT-testing',
        '--config.model.patch_size=2', '--config.dataset=digits', '--config.image_size=8',
        '--config.channels=1', '--config.batch_size=32', '--config.warmup_steps=2',
        '--config.base_lr=0.003', '--config.eval_batch_size=80', '--config.progress=False',
        '--config.augment=none', '--config.log_every=2', '--config.eval_every=6',
        '--config.checkpoint_every=3']
FAST_COMPILE = ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def main_cmd(workdir, *extra):
  return [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *TINY, *extra]


@pytest.mark.slow  # ~45 s on 2 busy cores: two trainings and a restore, each compiling anew
def test_main_in_two_processes_logs_once_and_checkpoints_every_shard(tmp_path):
  workdir = str(tmp_path / 'run')
  coordinator = f'127.0.0.1:{worker.free_port()}'
  # The coordinator and process index come from the environment, as a launcher would set them;
  # vit_jax.main passes JAX_NUM_PROCESSES / JAX_PROCESS_ID on (JAX reads only the address).
  envs = [worker.worker_env(
      XLA_FLAGS='--xla_force_host_platform_device_count=4' + FAST_COMPILE,
      JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i))
      for i in range(2)]
  cmd = main_cmd(workdir, '--config.total_steps=6', '--config.distributed=True')
  results = worker.run_all([cmd, cmd], timeout=300, envs=envs)
  worker.check_ok(results)

  # Only process 0 reports and writes logs: one result line, each logged step once, one event file.
  assert ['result: ' in out for _, out in results] == [True, False]
  result = json.loads(results[0][1].split('result: ')[-1].splitlines()[0])
  assert result['step'] == 6 and result['eval_count'] > 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [2, 3, 4, 6]  # log_every 2, plus the checkpoint step 3
  assert len(glob.glob(os.path.join(workdir, 'tensorboard', '**', 'events.*'), recursive=True)) == 1
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']

  # The checkpoint holds both processes' shards: one process with all 8 devices restores it and
  # goes on from step 6.
  env = worker.worker_env(XLA_FLAGS='--xla_force_host_platform_device_count=8' + FAST_COMPILE)
  (rc, out), = worker.run_all([main_cmd(workdir, '--config.total_steps=7')], timeout=300,
                              envs=[env])
  assert rc == 0, out[-4000:]
  assert 'resumed from' in out and 'step 6' in out
  resumed = json.loads(out.split('result: ')[-1].splitlines()[0])
  assert resumed['step'] == 7
