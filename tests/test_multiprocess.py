"""Multi-host training on one machine: two real JAX processes of 4 CPU devices each, joined by
`jax.distributed` through a coordinator on 127.0.0.1 and gloo collectives, train exactly as one
process of 8 devices does (the library path, tests/sharding_worker.py). The command line in two
processes, started the way the launchers start it (logs from process 0 only, a checkpoint with every
process's shards that one process restores, the same training as one process) is tested in
tests/test_launch.py.

Every subprocess has a timeout, and `sharding_worker.run_all` kills whatever is still running when
a test fails or times out. Tolerances are those of tests/test_sharding.py (see its docstring): the
two layouts run the same partitioned program; only the cross-process all-reduce (gloo) may sum in
another order.
"""
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
