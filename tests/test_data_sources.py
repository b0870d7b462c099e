"""Sources: arrays, fashion_mnist, digits, image folders, TFDS (mock data); splits; clear errors."""
from collections import Counter
import os

import numpy as np
import pytest

from tests.data_helpers import make_folder
from vit_jax.data import ArraySource, dataset_info, get_source
from vit_jax.data import sources_builtin
from vit_jax.data.sources import parse_split, slice_indices

FASHION = sources_builtin.FASHION_MNIST_DIR
has_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')


def test_split_strings():
  assert parse_split('train') == ('train', None)
  assert parse_split('train[:98%]') == ('train', ('', '98%'))
  assert list(slice_indices(100, ('', '98%'))) == list(range(98))
  assert list(slice_indices(100, ('98%', ''))) == [98, 99]
  assert list(slice_indices(10, ('-3', ''))) == [7, 8, 9]
  assert list(slice_indices(10, ('2', '5'))) == [2, 3, 4]
  with pytest.raises(ValueError, match='cannot parse split'):
    parse_split('train[[1')


def test_array_source():
  images = np.zeros((5, 4, 6, 3), np.uint8)
  src = ArraySource(images, [0, 1, 2, 1, 0], class_names=['a', 'b', 'c'])
  assert len(src) == 5 and src.num_classes == 3 and src.class_names == ['a', 'b', 'c']
  ex = src[3]
  assert ex['image'].shape == (4, 6, 3) and ex['image'].dtype == np.uint8 and ex['label'] == 1
  assert ArraySource(np.zeros((2, 4, 4), np.uint8), [0, 3]).images.shape == (2, 4, 4, 1)
  assert ArraySource(np.zeros((2, 4, 4), np.uint8), [0, 3]).num_classes == 4
  with pytest.raises(ValueError, match='uint8'):
    ArraySource(np.zeros((2, 4, 4, 3), np.float32), [0, 1])
  with pytest.raises(ValueError, match='labels'):
    ArraySource(images, [0, 1])


@has_fashion
def test_fashion_mnist():
  train = get_source('fashion_mnist', split='train')
  test = get_source('fashion_mnist', data_dir=FASHION, split='test')
  assert (len(train), len(test)) == (60_000, 10_000)
  assert train.images.shape == (60_000, 28, 28, 1) and train.images.dtype == np.uint8
  assert train.num_classes == 10 and train.class_names[0] == 'T-shirt/top'
  assert set(np.unique(test.labels)) == set(range(10))
  # held_out is for data without a test split; this one has one, so train stays whole.
  assert len(get_source('fashion_mnist', split='train', held_out=0.1)) == 60_000
  val, rest = (get_source('fashion_mnist', split=s) for s in ('train[90%:]', 'train[:90%]'))
  assert (len(val), len(rest)) == (6_000, 54_000)
  np.testing.assert_array_equal(val.images[0], train.images[54_000])
  with pytest.raises(ValueError, match=r"no 'validation' split.*train\[90%:\]"):
    get_source('fashion_mnist', split='validation')
  assert dataset_info('fashion_mnist')[0] == 10


def test_fashion_mnist_missing_dir_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    get_source('fashion_mnist', data_dir=str(tmp_path), split='train')


def test_digits():
  train, test = get_source('digits', split='train'), get_source('digits', split='test')
  assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
  assert train.images.max() == 255 and train.num_classes == 10
  # The hold-out is fixed by the seed: same seed, same split; and it is disjoint from train.
  again = get_source('digits', split='test')
  np.testing.assert_array_equal(test.images, again.images)
  # Disjoint and complete: as multisets of (image, label), train + test is the whole data set, so
  # no example is in both (the data has repeated images; a multiset counts them as often as they occur).
  images, labels = sources_builtin._digits_arrays()  # pylint: disable=protected-access
  examples = lambda ims, labs: Counter(im.tobytes() + bytes([int(l)]) for im, l in zip(ims, labs))
  assert examples(train.images, train.labels) + examples(test.images, test.labels) == \
      examples(images, labels)
  other = get_source('digits', split='test', seed=1)
  assert not np.array_equal(other.images, test.images)   # and the seed chooses it
  assert len(get_source('digits', split='validation')) == len(test)


def test_folder_with_splits(tmp_path):
  root = make_folder(str(tmp_path / 'pets'), per_class=4, splits=('train', 'test'))
  train = get_source(root, split='train')
  test = get_source(f'folder:{root}', split='test')
  assert len(train) == 12 and len(test) == 12
  assert train.class_names == ['cat', 'dog', 'fox'] and train.num_classes == 3
  ex = train[5]
  assert isinstance(ex['image'], bytes) and ex['name'].endswith(('.jpg', '.png', '.jpeg', '.bmp'))
  assert ex['label'] == 1
  with pytest.raises(ValueError, match=f"{root} has no 'validation' split"):
    get_source(root, split='validation')
  # Slices of a folder are taken in a fixed random order, not the last class.
  val = get_source(root, split='train[75%:]')
  assert len(val) == 3 and len(get_source(root, split='train[:75%]')) == 9
  assert len(set(val.labels)) > 1
  assert not set(val.files) & set(get_source(root, split='train[:75%]').files)


def test_folder_with_only_train_holds_out_a_fraction(tmp_path):
  root = make_folder(str(tmp_path / 'pets'), per_class=10, splits=('train',))
  train, test = get_source(root, split='train'), get_source(root, split='validation')
  assert (len(train), len(test)) == (27, 3)
  assert len(get_source(root, split='test', held_out=0.2)) == 6


def test_flat_folder_holds_out_a_fraction(tmp_path):
  root = make_folder(str(tmp_path / 'flat'), per_class=10, splits=(None,))
  train, test = get_source(root, split='train'), get_source(root, split='test')
  assert (len(train), len(test)) == (27, 3)
  assert not set(train.files) & set(test.files)
  assert len(get_source(root, split='train', held_out=0.0)) == 30


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    get_source(str(tmp_path / 'nope'), split='train')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f'{empty}.*no class folders'):
    get_source(str(empty), split='train')
  root = make_folder(str(tmp_path / 'x'), per_class=2, splits=('train',))
  (tmp_path / 'x' / 'train' / 'empty_class').mkdir()
  with pytest.raises(FileNotFoundError, match='empty_class has no images'):
    get_source(root, split='train')


def test_tfds_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = get_source('cifar10', data_dir='/nonexistent/tfds', split='train[:98%]')
    assert len(src) == 6 and src.num_classes == 10
    ex = src[2]
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (32, 32, 3)
    assert 0 <= ex['label'] < 10
    pets = get_source('tfds:oxford_iiit_pet', split='test')
    assert pets.num_classes == 37 and pets.class_names[0] == 'Abyssinian'


def test_tfds_unprepared_names_the_fix(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match=f'tfds build cifar10 --data_dir={tmp_path}'):
    get_source('cifar10', data_dir=str(tmp_path), split='train')


def test_a_folder_of_images_without_class_folders_is_unlabelled(tmp_path):
  from tests.data_helpers import write_image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  flat = tmp_path / 'flat'
  flat.mkdir()
  for i in range(20):
    write_image(str(flat / f'{i:02d}.jpg'), rng)
  train, test = get_source(str(flat), split='train'), get_source(str(flat), split='test')
  assert (len(train), len(test)) == (18, 2) and train.num_classes == 0
  assert train.class_names is None and train[0]['label'] == 0
  split = tmp_path / 'split'
  for part, n in (('train', 6), ('test', 2)):
    (split / part).mkdir(parents=True)
    for i in range(n):
      write_image(str(split / part / f'{i}.png'), rng)
  assert len(get_source(str(split), split='test')) == 2
  # One split labelled, the other not: refused, naming the folder.
  (split / 'test' / 'cat').mkdir()
  write_image(str(split / 'test' / 'cat' / 'x.png'), rng)
  with pytest.raises(ValueError, match='label every split or none'):
    get_source(str(split), split='test')
