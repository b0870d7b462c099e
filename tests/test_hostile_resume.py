"""A run's own checkpoints, damaged: a step with a missing, truncated, zeroed or bit-flipped file
(array data, metadata, the data-pipeline state) restores a state that was saved, bitwise: the newest
intact step, with a warning naming the one skipped (moved aside to `<step>.unreadable`), never
silently different numbers; a resumed training run ends with the parameters of an uninterrupted one.
Reading a corrupted step directly (predict, --config.pretrained) is an error naming it. Counts go to
$VIT_JAX_RELIABILITY_LOG (tests/reliability_log.py).
"""
from __future__ import annotations

import gc
import logging
import pathlib
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
import jax
import numpy as np
import pytest

from tests.reliability_log import record
from vit_jax.checkpoints import manager as ckpt_lib

_QUIET = dict(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FAST, SLOW = settings(max_examples=15, **_QUIET), settings(max_examples=300, **_QUIET)
# Orbax's asyncio threads complain at exit about restores that failed (the corruption under test).
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
  yield
  gc.collect()  # here, under the filter above, not in whichever test runs next


def flip(data: bytes, bit: int) -> bytes:
  b = bytearray(data)
  b[bit // 8] ^= 1 << (bit % 8)
  return bytes(b)


def fresh(tmp_path: pathlib.Path) -> pathlib.Path:
  """A new directory per hypothesis example (they share the test's tmp_path)."""
  return pathlib.Path(tempfile.mkdtemp(dir=tmp_path))


def run_state(step: int) -> dict:
  """A TrainState-like tree: params, optimizer moments, an int step, a uint32 key."""
  rng = np.random.default_rng(step)
  params = {'w': rng.standard_normal((48, 64)).astype(np.float32),
            'b': rng.standard_normal(64).astype(np.float32)}
  return {'step': np.asarray(step, np.int32), 'params': params,
          'opt_state': {'mu': jax.tree.map(lambda x: x * 0.5, params),
                        'count': np.asarray(step, np.int32)},
          'rng': np.array([0, step], np.uint32)}


def abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """checkpoints/{1,2} of a run, written by the project's manager."""
  root = tmp_path_factory.mktemp('run') / 'checkpoints'
  manager = ckpt_lib.CheckpointManager(str(root), keep_best=False, async_save=False)
  for step in (1, 2):
    manager.save(step, run_state(step), {'step': step}, {'note': 'hostile'})
  manager.close()
  return root


def step_files(root: pathlib.Path, step: int = 2) -> list[str]:
  return sorted(str(p.relative_to(root / str(step))) for p in (root / str(step)).rglob('*')
                if p.is_file())


def damage(root: pathlib.Path, rel: str, kind: str, bit: int = 0) -> None:
  path = root / '2' / rel
  data = path.read_bytes()
  if kind == 'missing':
    path.unlink()
  elif kind == 'truncated':
    path.write_bytes(data[: len(data) // 2])
  elif kind == 'zeroed':
    path.write_bytes(b'\0' * len(data))
  else:
    path.write_bytes(flip(data, bit % (8 * max(len(data), 1))) if data else b'\1')


def resume(root: pathlib.Path, caplog) -> int:
  """Restores the newest good step like a resumed run; asserts it is bitwise what was saved, and
  that the run can save the next steps again. Returns the step."""
  manager = ckpt_lib.CheckpointManager(str(root), keep_best=False, async_save=False)
  with caplog.at_level(logging.WARNING):
    state, data, _, step = manager.restore(abstract(run_state(2)))
  assert data == {'step': step}
  got = jax.tree.map(np.asarray, state)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                                   got, run_state(step)))
  if step == 1:  # fell back: said so, set step 2 aside, and the resumed run can write it afresh
    assert any('step 2' in r.getMessage() and 'trying the previous one' in r.getMessage()
               for r in caplog.records)
    assert (root / '2.unreadable').is_dir() and not (root / '2').exists()
    manager.save(2, run_state(2), {'step': 2}, {'note': 'again'})
  manager.close()
  return step


@pytest.mark.parametrize('kind', ['missing', 'truncated', 'zeroed', 'bitflip'])
def test_corrupted_array_file_falls_back_to_the_previous_step(run_dir, tmp_path, caplog, kind):
  root = tmp_path / 'checkpoints'
  shutil.copytree(run_dir, root)
  data_files = [f for f in step_files(root) if f.startswith('state/') and '/d/' in f]
  biggest = max(data_files, key=lambda f: (root / '2' / f).stat().st_size)
  damage(root, biggest, kind, bit=12345)  # orbax alone restores this flip as wrong numbers
  assert resume(root, caplog) == 1
  with pytest.raises(ckpt_lib.CheckpointError, match='2.unreadable'):
    ckpt_lib.load_params(str(root / '2.unreadable'))  # not a step name: refused outright
  record('checkpoints', f'orbax/array-file-{kind}', 'skipped')


def test_reading_a_corrupted_step_directly_is_an_error_naming_it(run_dir, tmp_path):
  root = tmp_path / 'checkpoints'
  shutil.copytree(run_dir, root)
  data_files = [f for f in step_files(root) if f.startswith('state/') and '/d/' in f]
  damage(root, max(data_files, key=lambda f: (root / '2' / f).stat().st_size), 'bitflip', 999)
  with pytest.raises(ckpt_lib.CheckpointError, match=f'{root / "2"} is corrupted'):
    ckpt_lib.load_params(str(root))  # predict / --config.pretrained: no silent fall-back
  record('checkpoints', 'orbax/read-corrupted-step', 'error')


@pytest.mark.slow  # two short training runs (~25 s of CPU)
def test_training_resumes_past_a_corrupted_checkpoint_to_the_same_parameters(tmp_path, caplog):
  from configs import quickstart
  from vit_jax.train import loop
  c = quickstart.get_config('model=ViT-testing')
  for key, value in {'dataset': 'digits', 'image_size': 8, 'channels': 1, 'batch_size': 32,
                     'warmup_steps': 2, 'eval_batch_size': 100, 'progress': False,
                     'augment': 'none', 'total_steps': 12, 'checkpoint_every': 6,
                     'eval_every': 0, 'log_every': 6}.items():
    c[key] = value
  c.model.name, c.model.patch_size = 'ViT-testing', 2
  w = tmp_path / 'w'
  loop.train_and_evaluate(c, str(w))
  want = ckpt_lib.params_digest(ckpt_lib.load_params(str(w))[0])
  root = w / 'checkpoints'
  data_files = [f for f in step_files(root, 12) if f.startswith('state/') and '/d/' in f]
  path = root / '12' / max(data_files, key=lambda f: (root / '12' / f).stat().st_size)
  path.write_bytes(flip(path.read_bytes(), 4242))
  with caplog.at_level(logging.WARNING):
    result = loop.train_and_evaluate(c, str(w))  # resumes from step 6, redoes 7..12
  assert result.step == 12 and any('step 12' in r.getMessage() for r in caplog.records)
  assert ckpt_lib.params_digest(ckpt_lib.load_params(str(w))[0]) == want
  assert (root / '12.unreadable').is_dir()
  record('checkpoints', 'orbax/training-resume-past-corruption', 'skipped')


def _check_any_damage(run_dir, tmp_path, caplog, which: int, kind: str, bit: int) -> None:
  root = fresh(tmp_path) / 'checkpoints'
  shutil.copytree(run_dir, root)
  rel = step_files(root)[which % len(step_files(root))]
  damage(root, rel, kind, bit)
  step = resume(root, caplog)
  record('checkpoints', f'orbax/{rel.split("/")[0]}-{kind}', 'skipped' if step == 1 else 'read')


@FAST
@given(which=st.integers(0, 99), kind=st.sampled_from(['missing', 'truncated', 'bitflip']),
       bit=st.integers(0, 2 ** 20))
def test_any_damage_to_a_step_restores_a_saved_state_exactly(run_dir, tmp_path, caplog, which,
                                                             kind, bit):
  _check_any_damage(run_dir, tmp_path, caplog, which, kind, bit)


@pytest.mark.slow
@SLOW
@given(which=st.integers(0, 99),
       kind=st.sampled_from(['missing', 'truncated', 'zeroed', 'bitflip']),
       bit=st.integers(0, 2 ** 20))
def test_any_damage_to_a_step_restores_a_saved_state_exactly_many(run_dir, tmp_path, caplog, which,
                                                                  kind, bit):
  _check_any_damage(run_dir, tmp_path, caplog, which, kind, bit)
