"""Launchers: scripts/launch_tpu.sh and scripts/launch_slurm.sbatch print the right commands, refuse bad
usage with exit 2, and a real 2-process training started through the SLURM launcher on this machine
agrees with a 1-process run.

Both launchers start every worker with the one command of scripts/_launch_common.sh (`worker_argv`):
`python -m vit_jax.main --config=C --workdir=W --config.distributed=True ARGS`. The TPU launcher sends
it through `gcloud ... ssh --worker=all --command=...` (run here in a local shell, with a stub
interpreter); the SLURM launcher hands it to srun, played here by tests/fake_srun.sh, which starts
the tasks on 127.0.0.1 with the variables srun sets, so JAX's own SLURM detection joins them. gcloud,
when installed, parses every printed gcloud command (no account: it stops before any request).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests import sharding_worker as worker

ROOT = worker.ROOT
TPU = os.path.join(ROOT, 'scripts', 'launch_tpu.sh')
SLURM = os.path.join(ROOT, 'scripts', 'launch_slurm.sbatch')
FAKE_SRUN = os.path.join(ROOT, 'tests', 'fake_srun.sh')
# A config argument every shell would mangle unquoted: quotes, a command substitution, a glob.
ARGS = ['configs/pretrain.py', '--config.model.name=ViT-B_16', '--config.note=it\'s "q" $(x) *']
WORKDIR = '/mnt/shared/run 1'
MAIN = ['.venv/bin/python', '-m', 'vit_jax.main', '--config=configs/pretrain.py',
        f'--workdir={WORKDIR}', '--config.distributed=True', *ARGS[1:]]


def clean_env(**extra: str) -> dict:
  """This environment without anything a launcher reads (as if outside any SLURM job), plus extra."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('SLURM_') and k not in ('DRY_RUN', 'NODES', 'GPUS_PER_NODE', 'LOG_DIR')}
  env.update(extra)
  return env


def bash(*args: str, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                        text=True, timeout=60)


def commands(out: str) -> list[list[str]]:
  """The printed commands (one a line, shell-quoted), without the # comments."""
  return [shlex.split(line) for line in out.splitlines() if line.strip() and line[0] != '#']


def flag(argv: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def common_worker_command(*args: str) -> str:
  """`worker_command` of scripts/_launch_common.sh, the line both launchers embed."""
  res = bash('-c', 'source scripts/_launch_common.sh && worker_command "$@"', '_', *args)
  assert res.returncode == 0, res.stderr
  return res.stdout.strip()


def tpu(*options: str, name='my-tpu', zone='us-central2-b', kind='v4-32'):
  res = bash(TPU, name, zone, kind, *options)
  assert res.returncode == 0, res.stderr
  return res.stdout, commands(res.stdout)


# ---------------------------------------------------------------------------------------------
# Cloud TPU VMs.

def test_tpu_launcher_copies_sets_up_and_starts_every_worker():
  out, cmds = tpu('--project', 'proj', f'--workdir={WORKDIR}', '--', *ARGS)
  assert cmds[0][:3] == ['git', 'archive', '--format=tar.gz']
  assert [c[:5] for c in cmds[1:]] == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', verb] for verb in ('scp', 'ssh', 'ssh')]
  archive, scp, setup, start = cmds
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  assert archive[-1] == head  # tracked files of the commit, nothing else
  tarball = flag(archive, 'output')
  assert scp[5:7] == [tarball, 'my-tpu:vit_jax_src.tar.gz']
  for c in (scp, setup, start):
    assert '--worker=all' in c
    assert flag(c, 'zone') == 'us-central2-b' and flag(c, 'project') == 'proj'
  assert setup[5] == start[5] == 'my-tpu'

  setup_cmd = flag(setup, 'command')
  assert 'tar -xzf vit_jax_src.tar.gz -C vit_jax && cd vit_jax' in setup_cmd
  assert 'python3.11 -m venv .venv' in setup_cmd
  assert '.venv/bin/python -m pip install -q -r requirements.txt -r requirements-tpu.txt' in setup_cmd

  start_cmd = flag(start, 'command')
  train = common_worker_command('.venv/bin/python', ARGS[0], WORKDIR, *ARGS[1:])
  assert shlex.split(train) == MAIN
  assert f'nohup {train} > logs/"$(hostname)".log 2>&1 < /dev/null &' in start_cmd
  assert start_cmd.startswith('cd vit_jax && ')
  assert subprocess.run(['bash', '-n', '-c', start_cmd]).returncode == 0
  assert 'tail -n 50 -f vit_jax/logs/*.log' in out


def test_tpu_launcher_create_start_only_and_stop():
  _, cmds = tpu('--create', '--spot', '--workdir=gs://bucket/run', '--', *ARGS, kind='v5e-16')
  create = cmds[0]
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu']
  assert flag(create, 'accelerator-type') == 'v5litepod-16'  # gcloud's name for v5e
  assert flag(create, 'version') == 'v2-alpha-tpuv5-lite' and '--spot' in create
  assert len(cmds) == 5

  _, cmds = tpu('--no-setup', '--dir=/opt/my vit', '--workdir=/w', '--', *ARGS)
  assert len(cmds) == 1 and flag(cmds[0], 'command').startswith("cd '/opt/my vit' && ")

  _, cmds = tpu('--stop')
  assert len(cmds) == 1 and '--worker=all' in cmds[0]
  assert flag(cmds[0], 'command') == 'cd vit_jax && kill -TERM "$(cat logs/"$(hostname)".pid)"'


def test_tpu_start_command_runs_detached_with_its_arguments_intact(tmp_path):
  """The start and stop commands, run by a local shell as ssh would on a worker: the arguments
  arrive word for word, the training outlives the command, a second start is refused, and stop
  ends it. The interpreter is a stub that records its arguments and sleeps."""
  venv = tmp_path / 'vit_jax' / '.venv' / 'bin'
  venv.mkdir(parents=True)
  stub = venv / 'python'
  stub.write_text('#!/usr/bin/env bash\n'
                  f'{shlex.quote(sys.executable)} -c "import json, sys; '
                  f'json.dump(sys.argv[1:], open(\'argv.json\', \'w\'))" "$@"\n'
                  'exec sleep 60\n')
  stub.chmod(0o755)
  start = flag(tpu('--no-setup', f'--workdir={WORKDIR}', '--', *ARGS)[1][0], 'command')
  stop = flag(tpu('--stop')[1][0], 'command')
  host = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
  pid_file = tmp_path / 'vit_jax' / 'logs' / f'{host}.pid'
  pid = None
  try:
    t0 = time.time()
    res = subprocess.run(['bash', '-c', start], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert time.time() - t0 < 20  # returned while the "training" still runs
    pid = int(pid_file.read_text())
    argv_file = tmp_path / 'vit_jax' / 'argv.json'
    while not argv_file.exists() and time.time() - t0 < 20:
      time.sleep(0.1)
    assert json.loads(argv_file.read_text()) == MAIN[1:]
    os.kill(pid, 0)  # alive

    again = subprocess.run(['bash', '-c', start], cwd=tmp_path, capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 1 and 'already runs' in again.stderr

    assert subprocess.run(['bash', '-c', stop], cwd=tmp_path, timeout=30).returncode == 0
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
      time.sleep(0.1)
    assert not _alive(pid)
  finally:
    if pid and _alive(pid):
      os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A killed child of ours that nobody reaped is a zombie: gone for our purpose.
  with open(f'/proc/{pid}/stat') as f:
    return f.read().split(')')[-1].split()[0] != 'Z'


@pytest.mark.slow  # ~15 s: six gcloud starts
@pytest.mark.skipif(shutil.which('gcloud') is None, reason='gcloud is not installed')
def test_gcloud_parses_every_printed_command(tmp_path):
  """gcloud checks its arguments before anything else; without an account it then stops (exit 1,
  "no active account"). A misspelt flag is exit 2: the control below shows the check can fail."""
  env = clean_env(CLOUDSDK_CONFIG=str(tmp_path), CLOUDSDK_CORE_DISABLE_PROMPTS='1')
  cmds = tpu('--project=proj', '--create', '--spot', '--workdir=/w', '--', *ARGS)[1]
  cmds += tpu('--stop')[1]
  cmds = [c for c in cmds if c[0] == 'gcloud']
  assert len(cmds) == 5
  bad = [a.replace('--worker=', '--wroker=') for a in cmds[-1]]
  for argv in cmds + [bad]:
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    if argv is bad:
      assert res.returncode == 2 and 'unrecognized arguments' in res.stderr, res.stderr
    else:
      assert res.returncode == 1 and 'active account' in res.stderr, (argv, res.stderr)


# ---------------------------------------------------------------------------------------------
# SLURM.

@pytest.mark.parametrize('per_gpu, env, want', [
    # Outside an allocation: the #SBATCH lines (2 nodes, 8 GPUs each) or NODES / GPUS_PER_NODE.
    (False, {}, dict(nodes=2, ntasks=2, per_node=1, ids='0,1,2,3,4,5,6,7')),
    (True, {}, dict(nodes=2, ntasks=16, per_node=8)),
    (True, dict(NODES='4', GPUS_PER_NODE='4'), dict(nodes=4, ntasks=16, per_node=4)),
    # Inside one: SLURM's numbers; the host's CPUs are split among its tasks.
    (False, dict(SLURM_JOB_ID='7', SLURM_JOB_NUM_NODES='3', SLURM_GPUS_ON_NODE='4',
                 SLURM_CPUS_ON_NODE='64'), dict(nodes=3, ntasks=3, per_node=1, ids='0,1,2,3',
                                                cpus=64)),
    (True, dict(SLURM_JOB_ID='7', SLURM_JOB_NUM_NODES='3', SLURM_GPUS_ON_NODE='4',
                SLURM_CPUS_ON_NODE='64'), dict(nodes=3, ntasks=12, per_node=4, cpus=16)),
])
def test_slurm_dry_run_prints_the_srun_line_and_runs_nothing(tmp_path, per_gpu, env, want):
  # An srun that leaves a mark if anything calls it.
  (tmp_path / 'srun').write_text(f'#!/bin/sh\ntouch {tmp_path}/ran\n')
  (tmp_path / 'srun').chmod(0o755)
  env = clean_env(PATH=f'{tmp_path}:{os.environ["PATH"]}', **env)
  for dry in (['--dry-run'], []):  # the flag, or DRY_RUN=1
    res = bash(SLURM, *dry, *(['--per-gpu'] if per_gpu else []), '--workdir', WORKDIR, '--',
               *ARGS, env=dict(env, **({} if dry else {'DRY_RUN': '1'})))
    assert res.returncode == 0, res.stderr
    (srun,) = [c for c in commands(res.stdout) if c[0] == 'srun']
    exports = [c for c in commands(res.stdout) if c[0] == 'export']
    assert not (tmp_path / 'ran').exists()
    assert flag(srun, 'nodes') == str(want['nodes'])
    assert flag(srun, 'ntasks') == str(want['ntasks'])
    assert flag(srun, 'ntasks-per-node') == str(want['per_node'])
    assert flag(srun, 'kill-on-bad-exit') == '1'
    assert flag(srun, 'output') == 'logs/%x-%j-%t.out'
    assert ('--cpus-per-task=%d' % want['cpus'] in srun) if 'cpus' in want else all(
        not a.startswith('--cpus-per-task') for a in srun)
    assert exports == ([['export', f'JAX_LOCAL_DEVICE_IDS={want["ids"]}']] if 'ids' in want else [])
    start = srun.index('.venv/bin/python')
    assert srun[start:] == MAIN
    (line,) = [line for line in res.stdout.splitlines() if line.startswith('srun ')]
    assert line.endswith(' ' + common_worker_command('.venv/bin/python', ARGS[0], WORKDIR,
                                                     *ARGS[1:]))


@pytest.mark.parametrize('script, args, env', [
    (TPU, [], {}),
    (TPU, ['n', 'z'], {}),
    (TPU, ['--workdir=/w', 'n', 'z', 't', '--', 'c'], {}),
    (TPU, ['n', 'z', 't', '--workdir=/w'], {}),  # no -- CONFIG
    (TPU, ['n', 'z', 't', '--workdir=/w', '--'], {}),  # no CONFIG
    (TPU, ['n', 'z', 't', '--', 'c'], {}),  # no workdir
    (TPU, ['n', 'z', 't', '--workdir=runs/x', '--', 'c'], {}),  # not shared
    (TPU, ['n', 'z', 't', '--wokdir=/w', '--', 'c'], {}),
    (TPU, ['n', 'z', 't', '--workdir'], {}),
    (TPU, ['n', 'z', 'tpu9-8', '--create', '--workdir=/w', '--', 'c'], {}),  # no default runtime
    (SLURM, [], {}),
    (SLURM, ['--workdir=/w'], {}),
    (SLURM, ['--', 'c'], {}),
    (SLURM, ['--workdir=/w', '--'], {}),
    (SLURM, ['--gpus=8', '--workdir=/w', '--', 'c'], {}),
    (SLURM, ['--per-gpu', '--workdir=/w', '--', 'c'], {'GPUS_PER_NODE': '0'}),
    (SLURM, ['--workdir=/w', '--', 'c'], {'NODES': 'two'}),
])
def test_bad_usage_exits_2_with_the_usage(script, args, env):
  res = bash(script, *args, env=clean_env(**env))
  assert res.returncode == 2, (res.stdout, res.stderr)
  assert res.stderr.startswith('error: ') and '\nusage: ' in res.stderr
  assert res.stdout == ''


# ---------------------------------------------------------------------------------------------
# A real run through the SLURM launcher.

# A small digits job (8x8 grayscale, 10 classes), as in tests/test_train.py; batch sizes divide by 8.
CONFIG = 'configs/quickstart.py'
TINY = ['--config.model.name=ViT-testing', '--config.model.patch_size=2', '--config.dataset=digits',
        '--config.image_size=8', '--config.channels=1', '--config.batch_size=32',
        '--config.warmup_steps=2', '--config.base_lr=0.003', '--config.eval_batch_size=80',
        '--config.progress=False', '--config.augment=none', '--config.log_every=2',
        '--config.eval_every=6', '--config.checkpoint_every=3']


def cpu_env(devices: int, **extra: str) -> dict:
  """A worker's environment (as `sharding_worker.worker_env`) with `devices` CPU devices."""
  flags = f'--xla_force_host_platform_device_count={devices}' + worker.FAST_COMPILE
  return clean_env(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=flags, **extra)


def run_groups(cmds: list[list[str]], envs: list[dict], timeout: float) -> list[tuple[int, str]]:
  """Runs the commands at once, each in its own process group; [(return code, output)]. Whatever
  happens, every process they started (the launcher's tasks too) is killed before returning."""
  procs, logs = [], []
  try:
    for cmd, env in zip(cmds, envs):
      logs.append(tempfile.TemporaryFile(mode='w+'))
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + timeout
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
    out = []
    for p, log in zip(procs, logs):
      log.seek(0)
      out.append((p.returncode, log.read()))
    return out
  finally:
    for p in procs:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()
    for log in logs:
      log.close()


def read_metrics(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {row['step']: row for row in map(json.loads, f)}


def result_of(out: str) -> dict:
  return json.loads(out.split('result: ')[-1].splitlines()[0])


@pytest.mark.slow  # ~60 s on 2 busy cores: three short trainings, each compiling anew
def test_two_processes_through_the_slurm_launcher_agree_with_one_process(tmp_path):
  one, two, logs = tmp_path / 'one', tmp_path / 'two', tmp_path / 'logs'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(f'#!/bin/sh\nexec bash {shlex.quote(FAKE_SRUN)} "$@"\n')
  (bin_dir / 'srun').chmod(0o755)
  # An allocation of 2 hosts without GPUs; each task gets 4 CPU devices. srun's tasks find the
  # coordinator as on a cluster: first node of SLURM_STEP_NODELIST (127.0.0.1), port from
  # JAX_COORDINATOR_PORT instead of the job id.
  slurm = cpu_env(4, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242',
                  SLURM_JOB_NAME='vit_jax', SLURM_JOB_NUM_NODES='2', SLURM_SUBMIT_DIR=ROOT,
                  GPUS_PER_NODE='0', LOG_DIR=str(logs), JAX_COORDINATOR_PORT=str(worker.free_port()))
  launch = ['bash', SLURM, f'--workdir={two}', f'--python={sys.executable}', '--', CONFIG, *TINY,
            '--config.total_steps=6']
  reference = [sys.executable, '-m', 'vit_jax.main', f'--config={CONFIG}', f'--workdir={one}',
               *TINY, '--config.total_steps=6']
  (rc, out), (ref_rc, ref_out) = run_groups([launch, reference], [slurm, cpu_env(8)], timeout=400)
  assert ref_rc == 0, ref_out[-4000:]
  assert rc == 0, out[-2000:] + ''.join(
      f'\n--- {p}:\n' + p.read_text()[-3000:] for p in sorted(logs.glob('*.out')))
  assert '--ntasks=2 --ntasks-per-node=1' in out

  # Two processes of 4 devices, joined into one of 8; only process 0 reports and writes logs.
  task0, task1 = (logs / f'vit_jax-4242-{t}.out' for t in (0, 1))
  log0, log1 = task0.read_text(), task1.read_text()
  devices = [line for line in log0.splitlines() if 'devices: [' in line]
  assert len(devices) == 1 and devices[0].count('CpuDevice(') == 8
  assert 'result: ' in log0 and 'result: ' not in log1

  # The same training as one process of 8 devices: every logged step, and the final evaluation.
  got, ref = read_metrics(two), read_metrics(one)
  assert sorted(got) == sorted(ref) == [2, 3, 4, 6]  # log_every 2, plus the checkpoint step 3
  for step in ref:
    for key in ('loss', 'grad_norm'):
      assert got[step][key] == pytest.approx(ref[step][key], rel=worker.LOSS_RTOL), (step, key)
  res, ref_res = result_of(log0), result_of(ref_out)
  assert res['step'] == ref_res['step'] == 6
  assert res['eval_loss'] == pytest.approx(ref_res['eval_loss'], rel=worker.LOSS_RTOL)
  assert abs(res['eval_top1'] - ref_res['eval_top1']) <= 1 / res['eval_count'] + 1e-9
  assert sorted(os.listdir(two / 'checkpoints')) == ['3', '6']
  assert len(list((two / 'tensorboard').rglob('events.*'))) == 1

  # The checkpoint holds both processes' shards: one process with all 8 devices restores it and
  # goes on from step 6.
  ((rc, out),) = run_groups([[sys.executable, '-m', 'vit_jax.main', f'--config={CONFIG}',
                              f'--workdir={two}', *TINY, '--config.total_steps=7']],
                            [cpu_env(8)], timeout=300)
  assert rc == 0, out[-4000:]
  assert 'resumed from' in out and 'step 6' in out
  assert result_of(out)['step'] == 7
