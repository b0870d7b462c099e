"""The loader: every source batches; determinism over workers and processes; state; eval; bad data."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from tests.data_helpers import add_bad_files, make_folder
from vit_jax.data import (ArraySource, eval_batches, get_source, num_eval_batches,
                          train_iterator)

FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(str(tmp_path_factory.mktemp('imgs') / 'root'), per_class=8)


def numbered(n=40, size=8, channels=1):
  """Arrays whose label is the example's index, so batches say which examples they hold."""
  rng = np.random.default_rng(0)
  return ArraySource(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), np.arange(n))


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def check_train_batch(batch, b, size, channels, k):
  assert batch['image'].shape == (b, size, size, channels) and batch['image'].dtype == np.float32
  assert batch['labels'].shape == (b, k) and batch['labels'].dtype == np.float32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  np.testing.assert_allclose(batch['labels'].sum(1), 1.0, rtol=1e-6)


def sources(folder):
  yield 'arrays', numbered(), 'resize'
  yield 'digits', get_source('digits', split='train'), 'pad_crop_flip'
  if os.path.exists(FASHION):
    yield 'fashion_mnist', get_source('fashion_mnist', split='test'), 'pad_crop_flip'
  yield 'folder', get_source(folder, split='train'), 'inception_crop'


def test_every_source_trains_and_evaluates(folder):
  for name, src, augment in sources(folder):
    for channels in (1, 3):
      it = train_iterator(src, image_size=16, channels=channels, global_batch_size=6, seed=0,
                          augment=augment, num_classes=src.num_classes, prefetch=0)
      check_train_batch(next(it), 6, 16, channels, src.num_classes)
    ev = eval_batches(src, image_size=16, channels=3, global_batch_size=7)
    first = next(iter(ev))
    assert first['image'].shape == (7, 16, 16, 3) and first['label'].dtype == np.int32, name
    assert first['mask'].dtype == bool and first['mask'].all(), name


def test_tfds_source_trains_through_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    src = get_source('cifar10', data_dir='/nonexistent', split='train')
    it = train_iterator(src, image_size=24, channels=3, global_batch_size=4, seed=0,
                        augment='inception_crop', num_classes=10, workers=2, worker_type='thread')
    check_train_batch(next(it), 4, 24, 3, 10)
    it.close()
    seen = sum(b['mask'].sum() for b in eval_batches(src, image_size=24, channels=3,
                                                     global_batch_size=4, crop=True))
    assert seen == 10


def test_same_seed_same_batches_with_any_number_of_workers(folder):
  src = get_source(folder, split='train')
  runs = []
  settings = ((0, 0, 'thread'), (1, 2, 'thread'), (2, 3, 'thread'), (1, 1, 'process'),
              (2, 2, 'process'))
  for workers, prefetch, kind in settings:
    it = train_iterator(src, image_size=16, channels=3, global_batch_size=8, seed=3,
                        augment='randaugment', num_classes=3, workers=workers, prefetch=prefetch,
                        worker_type=kind)
    runs.append(take(it, 4))  # 32 examples: crosses the 24-example epoch boundary
    it.close()
  for run in runs[1:]:
    assert_same(runs[0], run)
  other = train_iterator(src, image_size=16, channels=3, global_batch_size=8, seed=4,
                         augment='randaugment', num_classes=3)
  assert not np.array_equal(next(other)['image'], runs[0][0]['image'])


def test_grain_worker_processes_make_the_same_batches(folder):
  src = get_source(folder, split='train')
  kw = dict(image_size=16, channels=3, global_batch_size=8, seed=3, augment='inception_crop',
            num_classes=3)
  with train_iterator(src, **kw) as it:
    expected = take(it, 5)
  with train_iterator(src, **kw, workers=2, worker_type='process') as it:
    assert_same(expected[:2], take(it, 2))
    state = it.get_state()
    assert_same(expected[2:], take(it, 3))
    it.set_state(state)
    assert_same(expected[2:4], take(it, 2))


@pytest.mark.parametrize('kind', ['arrays', 'folder'])
def test_restoring_state_mid_epoch_continues_identically(kind, folder):
  src = numbered() if kind == 'arrays' else get_source(folder, split='train')
  kw = dict(image_size=12, channels=3, global_batch_size=4, seed=7, num_classes=src.num_classes,
            augment={'preset': 'inception_crop', 'mixup': 0.5, 'cutmix': 1.0}, workers=2,
            worker_type='thread')
  it = train_iterator(src, **kw)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = take(it, 5)
  it.close()
  resumed = train_iterator(src, **kw)
  resumed.set_state(state)
  assert_same(expected, take(resumed, 5))
  resumed.set_state(state)  # also while its prefetch thread is running
  assert_same(expected[:2], take(resumed, 2))
  resumed.close()
  with pytest.raises(ValueError, match='seed'):
    train_iterator(src, **dict(kw, seed=8)).set_state(state)


def test_two_processes_cover_each_epoch_disjointly_and_completely():
  src = numbered(n=40)
  kw = dict(image_size=8, channels=1, global_batch_size=8, seed=1, augment='inception_crop',
            num_classes=40, prefetch=0)
  whole = train_iterator(src, **kw)
  parts = [train_iterator(src, **kw, process_index=p, process_count=2) for p in range(2)]
  for epoch in range(2):
    seen = [[], []]
    for _ in range(5):  # 5 global batches of 8 = one epoch of 40
      full = next(whole)
      shares = [next(it) for it in parts]
      for p in range(2):
        seen[p].extend(shares[p]['labels'].argmax(1))
      # Process p holds rows [4p, 4p + 4) of the single-process global batch, bit for bit.
      assert_same([full], [{k: np.concatenate([s[k] for s in shares]) for k in full}])
    assert not set(seen[0]) & set(seen[1]), epoch
    assert sorted(seen[0] + seen[1]) == list(range(40)), epoch


def test_two_processes_of_decoded_images_split_the_same_global_batch(folder):
  src = get_source(folder, split='train')
  kw = dict(image_size=12, channels=3, global_batch_size=6, seed=2, augment='randaugment',
            num_classes=3, prefetch=0)
  whole = take(train_iterator(src, **kw), 5)  # 30 examples: crosses the 24-example epoch
  shares = [take(train_iterator(src, **kw, process_index=p, process_count=3), 5) for p in range(3)]
  joined = [{k: np.concatenate([s[i][k] for s in shares]) for k in whole[0]} for i in range(5)]
  assert_same(whole, joined)


def test_epochs_are_reshuffled():
  src = numbered(n=16)
  it = train_iterator(src, image_size=8, channels=1, global_batch_size=16, seed=0, augment='none',
                      num_classes=16, prefetch=0)
  a, b = (next(it)['labels'].argmax(1) for _ in range(2))
  assert sorted(a) == sorted(b) == list(range(16)) and list(a) != list(b)


@pytest.mark.parametrize('processes', [1, 2, 3])
def test_eval_counts_every_example_once(processes):
  src = numbered(n=10)
  batch = 6 if processes != 2 else 4  # never divides 10
  counts = np.zeros(10, int)
  steps = num_eval_batches(src, batch)
  for p in range(processes):
    ev = eval_batches(src, image_size=8, channels=1, global_batch_size=batch,
                      process_index=p, process_count=processes)
    assert len(ev) == steps
    batches = list(ev)
    assert len(batches) == steps
    for b in batches:
      assert b['image'].shape[0] == batch // processes
      np.add.at(counts, b['label'][b['mask']], 1)
      assert (b['image'][~b['mask']] == 0).all()
  assert (counts == 1).all()


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog, worker_type):
  root = make_folder(str(tmp_path / 'root'), per_class=3, splits=('train', 'test'))
  bad = add_bad_files(os.path.join(root, 'train', 'dog'))
  add_bad_files(os.path.join(root, 'test', 'fox'))
  src = get_source(root, split='train')
  assert len(src) == 11
  it = train_iterator(src, image_size=16, channels=3, global_batch_size=4, seed=0,
                      augment='inception_crop', num_classes=3, workers=2,
                      worker_type=worker_type)
  with caplog.at_level(logging.WARNING, logger='vit_jax.data.loader'):
    for _ in range(9):  # a bit over three epochs
      check_train_batch(next(it), 4, 16, 3, 3)
  it.close()
  assert it.skipped_images == 2
  assert all(any(path in r.getMessage() for r in caplog.records) for path in bad)
  ev = eval_batches(get_source(root, split='test'), image_size=16, channels=3, global_batch_size=4,
                    workers=2, worker_type=worker_type)
  assert sum(int(b['mask'].sum()) for b in ev) == 9 and ev.skipped_images == 2


def test_sharded_global_arrays():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  b = 2 * len(jax.devices())
  it = train_iterator(numbered(), image_size=8, channels=1, global_batch_size=b, seed=0,
                      augment='pad_crop_flip', num_classes=40, sharding=sharding)
  batch = next(it)
  assert isinstance(batch['image'], jax.Array) and batch['image'].shape == (b, 8, 8, 1)
  assert batch['image'].sharding == sharding and batch['labels'].shape == (b, 40)
  it.close()
  ev = next(iter(eval_batches(numbered(), image_size=8, channels=1, global_batch_size=b,
                              sharding=sharding)))
  assert isinstance(ev['mask'], jax.Array) and ev['label'].shape == (b,)


def test_in_memory_batches_are_augmented_whole_not_per_example(monkeypatch):
  """28x28 pad-crop-flip from arrays runs one vectorised NumPy call per batch (cheap enough to keep
  up with any CPU step; `scripts/benchmark.py data --source fashion_mnist` measures it), never the
  per-example decode path, and still varies crops and flips within the batch."""
  from vit_jax.data import preprocess as pp
  calls = []
  real_batch = pp.train_batch
  monkeypatch.setattr(pp, 'train_batch', lambda *a, **k: calls.append(1) or real_batch(*a, **k))

  def per_example(*a, **k):
    raise AssertionError('in-memory arrays went through the per-example path')
  monkeypatch.setattr(pp, 'train_example', per_example)
  images = np.zeros((64, 28, 28, 1), np.uint8)
  images[:, 10:18, 4:12] = 255  # an off-centre square: crops and flips move it
  src = ArraySource(images, np.zeros(64, int), num_classes=10)
  it = train_iterator(src, image_size=28, channels=1, global_batch_size=32, seed=0,
                      augment='pad_crop_flip', num_classes=10, prefetch=0, workers=2)
  batches = take(it, 3)
  it.close()
  assert len(calls) == 3
  first = np.asarray(batches[0]['image'])
  assert first.shape == (32, 28, 28, 1)
  assert len({first[i].tobytes() for i in range(32)}) > 8  # augmented per example, not per batch


def test_batches_without_labels_for_objectives_that_need_none():
  src = numbered()
  it = train_iterator(src, image_size=8, channels=1, global_batch_size=8, seed=0,
                      augment='none', num_classes=40, labels=False)
  batch = next(it)
  assert set(batch) == {'image'}
  with_labels = next(train_iterator(src, image_size=8, channels=1, global_batch_size=8, seed=0,
                                    augment='none', num_classes=40))
  np.testing.assert_array_equal(batch['image'], with_labels['image'])  # the same images
  it.close()
  evals = list(eval_batches(src, image_size=8, channels=1, global_batch_size=16, labels=False))
  assert set(evals[0]) == {'image', 'mask'} and sum(int(b['mask'].sum()) for b in evals) == 40
  unlabelled = ArraySource(src.images, np.zeros(40, np.int64), num_classes=1)
  unlabelled.num_classes = 0
  with pytest.raises(ValueError, match='no labels'):
    train_iterator(unlabelled, image_size=8, channels=1, global_batch_size=8, seed=0,
                   augment='none', num_classes=0)
