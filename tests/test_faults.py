"""Faults during training: NaN gradients, a full disk during an asynchronous
save, and a process lost from a two-process run. The SIGKILL soak is in tests/test_train.py.

Each fault test appends its outcome to $VIT_JAX_RELIABILITY_LOG (tests/reliability_log.py):
category 'fault' ('survived': the run stopped or went on as documented, nothing lost; 'lost'
otherwise) and, where the run is resumed, 'resume' ('bitwise' or 'differs' against an
uninterrupted run).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.reliability_log import record
from tests.test_train import ROOT, digest, main_cmd, run_main, tiny_config

# ---------------------------------------------------------------------------------------------
# Non-finite values. The injection is test-only: at the chosen steps the batch's first label is
# shifted by -SENTINEL, and a patched `classify.loss_fn` (traced into the real jitted step) undoes
# the shift exactly and multiplies the gradient flowing into the logits by NaN. The loss stays
# finite, every gradient becomes NaN: only a check of the gradients can name the step.

SENTINEL = 10.0  # labels are 0/1 without smoothing: 0 - 10 + 10 and 1 - 10 + 10 are exact


def _nan_grad():
  import jax
  import jax.numpy as jnp

  @jax.custom_vjp
  def nan_grad(x, flag):
    return x

  def fwd(x, flag):
    return x, flag

  def bwd(flag, g):
    return jnp.where(flag, jnp.nan, 1.0).astype(g.dtype) * g, None

  nan_grad.defvjp(fwd, bwd)
  return nan_grad


def inject_nan_gradients(monkeypatch, at_steps):
  """Makes the real train step produce NaN gradients (and a finite loss) at `at_steps` (1-based)."""
  import jax
  import jax.numpy as jnp
  from vit_jax.objectives import classify
  from vit_jax.train import step as step_lib
  real_loss, real_make = classify.loss_fn, step_lib.make_train_step
  nan_grad = _nan_grad()

  def loss_fn(logits, labels, kind='softmax_xent'):
    flag = labels[0, 0] < -1.0
    labels = labels.at[0, 0].add(jnp.where(flag, SENTINEL, 0.0))
    return real_loss(nan_grad(logits, flag), labels, kind)

  def make_train_step(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)

    def step(state, batch):
      if int(jax.device_get(state.step)) + 1 in at_steps:
        batch = {**batch, 'labels': batch['labels'].at[0, 0].add(-SENTINEL)}
      return step_fn(state, batch)
    return step

  monkeypatch.setattr(classify, 'loss_fn', loss_fn)  # the classification objective's loss
  monkeypatch.setattr(step_lib, 'make_train_step', make_train_step)


def test_nan_gradients_stop_the_run_naming_the_step(tmp_path, monkeypatch):
  from vit_jax.checkpoints.manager import load_params
  from vit_jax.train import loop
  inject_nan_gradients(monkeypatch, {7})
  config = tiny_config(total_steps=30, checkpoint_every=2, eval_every=0, log_every=10)
  # A loss-only check would stop one step late ("loss is nan at step 8"), after NaN parameters.
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'gradient norm is nan \(loss [0-9.]+\) at step 7;'):
    loop.train_and_evaluate(config, str(tmp_path / 'w'))
  params, meta = load_params(tmp_path / 'w')
  assert meta['step'] == 6  # the last good checkpoint; nothing after the NaN was saved
  import numpy as np
  assert all(np.isfinite(np.asarray(v)).all() for v in _leaves(params))
  record('fault', 'nan-gradients/stop', 'survived')


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, monkeypatch):
  """With skip_nonfinite the run goes on: the skipped steps leave parameters, optimizer state
  (Adam's moments and count) and EMA bitwise as they were, the others train, and metrics.jsonl
  counts them (`skipped_updates`)."""
  import numpy as np
  from vit_jax.checkpoints.manager import load_params
  from vit_jax.train import loop
  inject_nan_gradients(monkeypatch, {3, 5})
  config = tiny_config(total_steps=6, checkpoint_every=1, keep_last=20, keep_best=False,
                       eval_every=0, log_every=2, skip_nonfinite=True, async_checkpoints=False,
                       ema_decay=0.9)
  w = tmp_path / 'w'
  result = loop.train_and_evaluate(config, str(w))
  assert result.step == 6 and result.skipped_updates == 2
  rows = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
  # A row per step (each is a checkpoint step): the count so far, the skipped steps' NaN norms.
  assert [r['skipped_updates'] for r in rows] == [0, 0, 1, 1, 2, 2]
  assert [r['step'] for r in rows if np.isnan(r['grad_norm'])] == [3, 5]
  assert all(np.isfinite(r['loss']) for r in rows)

  def state(step):
    d = w / 'checkpoints' / str(step)
    return [_leaves(load_params(d, part)[0]) for part in PARTS]

  before, skipped, after = state(2), state(3), state(4)
  for i, part in enumerate(PARTS):  # step 3 left everything as it was; step 4 trained again
    assert all(np.array_equal(x, y) for x, y in zip(before[i], skipped[i])), part
    assert not all(np.array_equal(x, y) for x, y in zip(skipped[i], after[i])), part
  assert load_params(w / 'checkpoints' / '3')[1]['step'] == 3  # the step counter moves on
  record('fault', 'nan-gradients/skip_nonfinite', 'survived')


PARTS = ('params', 'opt_state', 'ema_params')


def _leaves(tree):
  import jax
  import numpy as np
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_check_finite_names_the_step_of_a_nan_loss_or_gradient():
  import numpy as np
  from vit_jax.train import loop
  with pytest.raises(loop.NonFiniteLossError, match='loss is nan at step 3;'):
    loop._check_finite(3, {'loss': np.float32('nan'), 'grad_norm': np.float32('nan')})
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'gradient norm is inf \(loss 1.5\) at step 4;'):
    loop._check_finite(4, {'loss': np.float32(1.5), 'grad_norm': np.float32('inf')})
  skipped = set()
  for _ in range(2):  # a step is checked twice on logging steps; counted once
    loop._check_finite(5, {'loss': np.float32('nan'), 'grad_norm': np.float32('nan'),
                           'skipped': np.float32(1)}, skipped)
  loop._check_finite(6, {'loss': np.float32(1), 'grad_norm': np.float32(1),
                         'skipped': np.float32(0)}, skipped)
  assert skipped == {5}


def test_skip_nonfinite_is_validated():
  from vit_jax.train import validate
  import ml_collections
  # A recipe that writes skip_nonfinite = 1 makes the field an int, which the flags then accept.
  config = ml_collections.ConfigDict(dict(tiny_config().to_dict(), skip_nonfinite=1))
  with pytest.raises(validate.ConfigError, match='skip_nonfinite must be True or False'):
    validate.validate(config)
  config = tiny_config(heartbeat_timeout=0)
  with pytest.raises(validate.ConfigError, match='heartbeat_timeout must be'):
    validate.validate(config)


# ---------------------------------------------------------------------------------------------
# A full disk. A tmpfs is mounted for the workdir (root only: CI runs as root; skipped elsewhere).

@contextlib.contextmanager
def tmpfs(path, size_bytes):
  """A tmpfs of `size_bytes` mounted at `path` for the block; skips the test where mounting is
  not allowed (not root, or no CAP_SYS_ADMIN in a container)."""
  os.makedirs(path, exist_ok=True)
  if shutil.which('mount') is None:
    pytest.skip('no mount command: the disk-full tests need a tmpfs')
  out = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs', str(path)],
                       capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here ({out.stderr.strip()}); the disk-full tests need '
                'root (CI runs as root)')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


def fill(path, leave_free):
  """Writes `path` until `leave_free` bytes remain free on its filesystem."""
  free = shutil.disk_usage(os.path.dirname(path)).free
  with open(path, 'wb') as f:
    f.write(b'\0' * max(0, free - leave_free))
  return shutil.disk_usage(os.path.dirname(path)).free


def test_disk_full_in_an_async_save_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
  """CheckpointManager alone: the second of two 256 KiB states does not fit; the failure of the
  asynchronous write surfaces at the next save (or close) as DiskFullError naming the directory,
  the step, the free space and the checkpoint size; step 1 still restores; the half-written step
  is ignored, then deleted, by the next manager of the directory, which saves again."""
  import jax
  import numpy as np
  from vit_jax.checkpoints import manager as m
  state = {'w': np.arange(2 ** 16, dtype=np.float32)}  # 256 KiB
  with tmpfs(tmp_path / 'disk', 2 ** 20):
    directory = str(tmp_path / 'disk' / 'checkpoints')
    mgr = m.CheckpointManager(directory, keep_last=3, keep_best=False, async_save=True)
    mgr.save(1, state, {'pos': 1}, {})
    mgr.wait()
    used = sum(os.lstat(os.path.join(r, f)).st_blocks * 512
               for r, _, fs in os.walk(os.path.join(directory, '1')) for f in fs)
    fill(str(tmp_path / 'disk' / 'filler'), used // 2)
    with pytest.raises(m.DiskFullError) as e:
      mgr.save(2, {'w': state['w'] + 1}, {'pos': 2}, {})
      mgr.save(3, {'w': state['w'] + 2}, {'pos': 3}, {})  # surfaces step 2's failure
    msg = str(e.value)
    assert f'while writing checkpoint step 2 to {directory}:' in msg, msg
    assert 'MiB free there' in msg and 'needs about 0.2' in msg and 'step 1 is intact' in msg, msg
    mgr.close()  # the failure, already raised, is not raised again
    assert m.is_disk_full(e.value.__cause__)
    assert any('tmp' in d for d in os.listdir(directory)), os.listdir(directory)  # half-written
    os.remove(tmp_path / 'disk' / 'filler')
    again = m.CheckpointManager(directory, keep_last=3, keep_best=False)
    assert again.all_steps() == [1]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, data_state, _, step = again.restore(abstract)
    assert step == 1 and data_state == {'pos': 1}
    np.testing.assert_array_equal(restored['w'], state['w'])
    again.save(2, {'w': state['w'] + 1}, {'pos': 2}, {})  # orbax's clean-up completes here
    again.close()
    assert sorted(os.listdir(directory)) == ['1', '2']
  record('fault', 'disk-full/checkpoint-manager', 'survived')


@pytest.mark.slow
def test_disk_full_during_training_stops_then_resumes_bitwise(tmp_path):
  """`python -m vit_jax.main` with its workdir on a tmpfs that holds the first checkpoint but not
  the second (sized from a reference run's checkpoint, plus a filler file): the run stops, exit 1,
  with an `error:` line naming the directory and the space needed; the first checkpoint stays
  readable; after the filler is deleted the same command resumes from it, skips the half-written
  step and ends bitwise equal to the uninterrupted run."""
  args = ['--config.total_steps=40', '--config.checkpoint_every=10', '--config.eval_every=20',
          '--config.log_every=5', '--config.model.dropout_rate=0.1']
  ref = tmp_path / 'ref'
  run_main(ref, *args, timeout=900)
  want = digest(ref)
  size = sum(os.lstat(os.path.join(r, f)).st_blocks * 512  # the last checkpoint: step 40
             for r, _, fs in os.walk(ref / 'checkpoints' / '40') for f in fs)
  assert size > 0
  with tmpfs(tmp_path / 'disk', 8 * size + 2 ** 20):
    w = tmp_path / 'disk' / 'w'
    # Room for one checkpoint and a half (plus the logs); the second save runs out of space.
    free = fill(str(tmp_path / 'disk' / 'filler'), size * 3 // 2 + 2 ** 16)
    out = run_main(w, *args, check=False, timeout=900)
    # The reason is the process's last word; orbax's threads may still print after it at exit.
    last = ([l for l in out.stderr.splitlines() if l.startswith('error: ')] or [''])[-1]
    stopped = (out.returncode == 1 and last.startswith(
        f'error: no space left on device while writing checkpoint step 20 to {w / "checkpoints"}:'))
    kept = digest(w)[0] == 10 if stopped else False
    half = sorted(os.listdir(w / 'checkpoints'))
    os.remove(tmp_path / 'disk' / 'filler')
    again = run_main(w, *args, check=False, timeout=900)
    got = digest(w) if again.returncode == 0 else None
  record('fault', 'disk-full/async-save', 'survived' if stopped and kept else 'lost')
  record('resume', 'disk-full', 'bitwise' if got == want else 'differs')
  assert stopped, (free, size, out.returncode, _errors(out.stderr))
  assert 'needs about' in last and 'MiB free there' in last and 'step 10 is intact' in last, last
  assert kept and half == ['10', '20.orbax-checkpoint-tmp'], half
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from' in again.stderr and 'step 10' in again.stderr
  assert got == want


def _errors(stderr):
  """The lines of a log that are not INFO: warnings, errors, tracebacks."""
  return '\n'.join(l for l in stderr.splitlines() if not l.startswith('I'))[-5000:]


# ---------------------------------------------------------------------------------------------
# A process lost from a two-process run (jax.distributed on 127.0.0.1, as tests/test_multiprocess).

def _start_two(workdir, tag, started, *extra):
  """Starts `main` as processes 0 and 1 of a run (2 CPU devices each) on a fresh coordinator port;
  [(process, its log file)], also appended to `started` for the clean-up."""
  from tests import sharding_worker as worker
  coordinator = f'127.0.0.1:{worker.free_port()}'
  procs = []
  for i in range(2):
    env = worker.worker_env(XLA_FLAGS='--xla_force_host_platform_device_count=2',
                            JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES='2',
                            JAX_PROCESS_ID=str(i))
    log = open(f'{workdir}.{tag}.{i}.log', 'w+')
    procs.append((subprocess.Popen(main_cmd(workdir, *extra), cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True), log))
  started.extend(procs)
  return procs


def _output(log):
  log.flush()
  log.seek(0)
  return log.read()


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def _kill_one_and_time_the_other(procs, victim, workdir, after_step, timeout):
  """SIGKILL process `victim` once a metrics row beyond `after_step` exists; (seconds until the
  other process exited, its exit status, its output)."""
  deadline = time.time() + timeout
  while not [r for r in _rows(workdir) if r['step'] > after_step]:
    assert all(p.poll() is None for p, _ in procs), [_output(l)[-3000:] for _, l in procs]
    assert time.time() < deadline, 'the two processes made no progress'
    time.sleep(0.2)
  procs[victim][0].kill()
  t = time.time()
  survivor, log = procs[1 - victim]
  try:
    rc = survivor.wait(timeout=timeout)
  except subprocess.TimeoutExpired:  # a hang: the failure this test exists for
    rc = None
    survivor.kill()
  return time.time() - t, rc, _output(log)


@pytest.mark.slow
def test_lost_process_stops_the_other_then_both_resume(tmp_path):
  """Two processes train one run. Killing process 1 makes process 0 (which hosts the coordination
  service) exit with JAX's error naming the lost task within heartbeat_timeout (+ a margin);
  killing process 0 makes process 1 exit at once (its coordinator is gone). Each time both are
  started again with the same command and resume; the run ends bitwise equal to an uninterrupted
  two-process run."""
  heartbeat = 10
  # Batches of 32 and 100 split over 2 processes x 2 devices.
  args = ['--config.total_steps=30', '--config.checkpoint_every=4', '--config.log_every=1',
          '--config.eval_every=10', '--config.distributed=True',
          f'--config.heartbeat_timeout={heartbeat}']
  started = []
  try:
    ref = str(tmp_path / 'ref')
    for p, log in _start_two(ref, 'ref', started, *args):
      assert p.wait(timeout=600) == 0, _output(log)[-3000:]
    want = digest(ref)

    w = str(tmp_path / 'w')
    timings = {}
    for victim, case in ((1, 'worker'), (0, 'coordinator')):
      done = max([r['step'] for r in _rows(w)], default=0)
      procs = _start_two(w, case, started, *args)
      seconds, rc, out = _kill_one_and_time_the_other(procs, victim, w, done + 5, 600)
      clear = 'JAX distributed service detected fatal errors' in out
      ok = rc not in (None, 0) and clear and seconds < heartbeat + 30
      record('fault', f'lost-process/{case}', 'survived' if ok else 'lost',
             seconds=round(seconds, 1))
      timings[case] = (round(seconds, 1), rc)
      assert ok, (case, seconds, rc, out[-3000:])
      if victim == 1:
        # The service names the lost task: by its missed heartbeats, or, when the killed process's
        # connection drop is seen first (a loaded machine), as disconnected.
        reasons = ('tasks are unhealthy (stopped sending heartbeats)', 'has disconnected')
        assert any(r in out for r in reasons), [l for l in out.splitlines()
                                                if 'fatal' in l or 'task' in l.lower()]
    print('survivor exit (seconds, status):', timings)

    outs = []
    for p, log in _start_two(w, 'resume', started, *args):
      assert p.wait(timeout=600) == 0, _output(log)[-3000:]
      outs.append(_output(log))
    assert 'resumed from' in outs[0]
    got = digest(w)
    record('resume', 'lost-process', 'bitwise' if got == want else 'differs')
    assert got == want
  finally:
    for p, log in started:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
