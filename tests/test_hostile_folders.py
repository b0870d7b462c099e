"""Hostile image folders: class folders that differ between splits, Unicode and spaces, empty and
one-image classes, hidden files, symlinks inside and outside the root, link loops.

Labels always follow class names (NFC), whatever the split or the Unicode form of the folder; every
case is read, skipped with a warning naming it, or refused with an error naming it. Counts go to
$VIT_JAX_RELIABILITY_LOG (tests/reliability_log.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
import unicodedata

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
from PIL import Image
import pytest

from tests.reliability_log import record
from vit_jax.data import eval_batches, get_source

_QUIET = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST, SLOW = settings(max_examples=20, **_QUIET), settings(max_examples=300, **_QUIET)
LOGGER = 'vit_jax.data.sources_folder'

# Folder names: any script, spaces, combining marks; no '/', NUL, control or surrogate characters.
_CHARS = st.characters(blacklist_categories=('Cs', 'Cc'), blacklist_characters='/\\\0')
NAMES = st.text(_CHARS, min_size=1, max_size=12).map(str.strip).filter(
    lambda s: s and not s.startswith('.') and len(s.encode()) < 200)


def touch(path: str, data: bytes = b'x') -> str:
  """The folder source lists files without decoding them: any bytes will do."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def png(path: str, value: int) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)
  return path


def by_label(src) -> dict[str, set[str]]:
  """{class name: file names} as the source labels them."""
  out: dict[str, set[str]] = {}
  for f, label in zip(src.files, src.labels):
    out.setdefault(src.class_names[label], set()).add(os.path.basename(f))
  return out


@st.composite
def split_layouts(draw):
  """Train classes with 1-3 files each; test: a subset of them (maybe in NFD), maybe one extra."""
  names = draw(st.lists(NAMES, min_size=1, max_size=5,
                        unique_by=lambda s: unicodedata.normalize('NFC', s)))
  train = {n: draw(st.integers(1, 3)) for n in names}
  test = {n: draw(st.integers(1, 2)) for n in names if draw(st.booleans())} or {names[0]: 1}
  extra = draw(st.one_of(st.none(), NAMES))
  if extra is not None and unicodedata.normalize('NFC', extra) in {
      unicodedata.normalize('NFC', n) for n in names}:
    extra = None
  return train, test, extra, draw(st.booleans())


def _check_layout(layout) -> None:
  train, test, extra, nfd = layout
  with tempfile.TemporaryDirectory() as root:
    for split, classes in (('train', train), ('test', test)):
      for name, n in classes.items():
        folder = unicodedata.normalize('NFD', name) if nfd and split == 'test' else name
        for k in range(n):
          touch(os.path.join(root, split, folder, f'{name} {k}.jpg'))
    if extra is not None:
      touch(os.path.join(root, 'test', extra, 'x.png'))
      with pytest.raises(ValueError, match='that the train split does not have') as e:
        get_source(root, split='test')
      assert repr([unicodedata.normalize('NFC', extra)]) in str(e.value)
      record('folders', 'test-class-unknown-to-train', 'error')
      return
    tr, te = get_source(root, split='train'), get_source(root, split='test')
    nfc = {unicodedata.normalize('NFC', n): n for n in train}
    assert tr.class_names == te.class_names == sorted(nfc)
    for src, classes in ((tr, train), (te, test)):
      want = {unicodedata.normalize('NFC', n): {f'{n} {k}.jpg' for k in range(c)}
              for n, c in classes.items()}
      assert by_label(src) == want
    record('folders', f'classes-differ-by-split{"/nfd" if nfd else ""}', 'read')


@FAST
@given(split_layouts())
def test_labels_follow_class_names_across_splits(layout):
  _check_layout(layout)


@pytest.mark.slow
@SLOW
@given(split_layouts())
def test_labels_follow_class_names_across_splits_many(layout):
  _check_layout(layout)


def test_unicode_and_spaces_decode_with_their_labels(tmp_path):
  root = str(tmp_path / 'données d’entraînement')
  names = ['chat noir', 'Ελληνικά', '猫 🐈', 'e\u0301te\u0301']  # the last in NFD
  for k, name in enumerate(names):
    png(os.path.join(root, 'train', name, f'{name} photo.png'), 40 * k)
    png(os.path.join(root, 'test', unicodedata.normalize('NFC', name), 'x y.png'), 40 * k)
  tr, te = get_source(root, split='train'), get_source(root, split='test')
  assert tr.class_names == sorted(unicodedata.normalize('NFC', n) for n in names)
  for batch in eval_batches(te, image_size=6, channels=1, global_batch_size=4):
    for img, label in zip(batch['image'], batch['label']):  # pixel value says which class it is
      value = 40 * [unicodedata.normalize('NFC', n) for n in names].index(te.class_names[label])
      assert np.allclose(img, value / 127.5 - 1.0, atol=1e-6)
  record('folders', 'unicode-and-spaces', 'read')


def test_same_class_in_two_unicode_forms_is_an_error(tmp_path):
  touch(str(tmp_path / 'r' / 'caf\u00e9' / 'a.jpg'))
  touch(str(tmp_path / 'r' / 'cafe\u0301' / 'b.jpg'))
  with pytest.raises(ValueError, match='same class name in different Unicode forms'):
    get_source(str(tmp_path / 'r'), split='train')
  record('folders', 'class-in-two-unicode-forms', 'error')


def test_empty_class_in_train_is_an_error_in_test_a_warning(tmp_path, caplog):
  root = tmp_path / 'r'
  for split in ('train', 'test'):
    touch(str(root / split / 'ant' / '1.jpg'))
    touch(str(root / split / 'bee' / '1.jpg'))
  (root / 'test' / 'cat').mkdir()
  touch(str(root / 'test' / 'cat' / 'notes.txt'))  # not an image: still empty
  touch(str(root / 'train' / 'cat' / '1.jpg'))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    te = get_source(str(root), split='test')
  assert te.class_names == ['ant', 'bee', 'cat'] and sorted(te.labels) == [0, 1]
  assert any(str(root / 'test' / 'cat') in r.getMessage() for r in caplog.records)
  record('folders', 'empty-class-in-test', 'skipped')
  os.remove(root / 'train' / 'cat' / '1.jpg')
  with pytest.raises(FileNotFoundError, match=f'class folder {root / "train" / "cat"} has no'):
    get_source(str(root), split='train')
  record('folders', 'empty-class-in-train', 'error')


@pytest.mark.parametrize('held_out', [0.0, 0.5])
def test_a_class_with_one_image(tmp_path, held_out):
  root = tmp_path / 'r'
  touch(str(root / 'solo' / 'only.jpg'))
  for k in range(5):
    touch(str(root / 'many' / f'{k}.jpg'))
  parts = [get_source(str(root), split=s, held_out=held_out) for s in
           (('train',) if held_out == 0 else ('train', 'test'))]
  assert all(p.class_names == ['many', 'solo'] for p in parts)
  labelled = {(os.path.basename(f), int(l)) for p in parts for f, l in zip(p.files, p.labels)}
  assert labelled == {('only.jpg', 1)} | {(f'{k}.jpg', 0) for k in range(5)}
  record('folders', f'one-image-class/held_out={held_out}', 'read')


def test_hidden_files_and_folders_are_ignored(tmp_path):
  root = tmp_path / 'r'
  touch(str(root / 'train' / 'ant' / 'a.jpg'))
  for hidden in ('train/ant/.b.jpg', 'train/ant/._a.jpg', 'train/ant/.thumbs/c.jpg',
                 'train/.DS_Store', 'train/.cache/d.jpg', '.git/objects/e.png'):
    touch(str(root / hidden))
  src = get_source(str(root), split='train', held_out=0)
  assert src.class_names == ['ant'] and [os.path.basename(f) for f in src.files] == ['a.jpg']
  from vit_jax.predict import list_images  # predicting a folder skips the same files
  assert list_images([str(root)]) == [str(root / 'train' / 'ant' / 'a.jpg')]
  record('folders', 'hidden-files', 'read')


def test_symlinks_followed_inside_the_root_skipped_outside(tmp_path, caplog):
  root, outside = tmp_path / 'r', tmp_path / 'elsewhere'
  touch(str(root / 'ant' / 'a.jpg'))
  touch(str(root / 'bee' / 'b.jpg'))
  touch(str(root / 'shared' / 'c.jpg'))
  touch(str(outside / 'secret.jpg'))
  touch(str(outside / 'cls' / 'd.jpg'))
  links = {  # link -> target, inside or out
      'ant/linked.jpg': root / 'bee' / 'b.jpg', 'ant/sub': root / 'shared',
      'cow': root / 'shared', 'ant/loop': root / 'ant',
      'bee/escape.jpg': outside / 'secret.jpg', 'bee/escape_dir': outside / 'cls',
      'dog': outside / 'cls', 'bee/dotdot.jpg': root / '..' / 'elsewhere' / 'secret.jpg',
      'bee/dangling.jpg': outside / 'missing.jpg', 'bee/self.jpg': root / 'bee' / 'self.jpg'}
  for link, target in links.items():
    os.symlink(target, root / link)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    src = get_source(str(root), split='train', held_out=0)
  assert src.class_names == ['ant', 'bee', 'cow', 'shared']  # `dog` points outside
  assert by_label(src) == {'ant': {'a.jpg', 'linked.jpg', 'c.jpg'}, 'bee': {'b.jpg'},
                           'cow': {'c.jpg'}, 'shared': {'c.jpg'}}
  assert len(src) == 6  # each once: `ant/loop` (a link to ant itself) adds nothing
  skipped = ['bee/dangling.jpg', 'bee/dotdot.jpg', 'bee/escape.jpg', 'bee/escape_dir',
             'bee/self.jpg', 'dog']
  assert sorted(os.path.relpath(p, root) for p in src.skipped_links) == skipped
  for link in skipped:
    assert sum(str(root / link) in r.getMessage() for r in caplog.records) == 1, link
    record('folders', f'symlink-outside-root/{link}', 'skipped')
  for link in ('ant/linked.jpg', 'ant/sub', 'cow', 'ant/loop'):
    record('folders', f'symlink-inside-root/{link}', 'read')
  # The root itself may be a link (e.g. to a mounted disk): inside is judged after resolving it.
  os.symlink(root, tmp_path / 'alias')
  again = get_source(str(tmp_path / 'alias'), split='train', held_out=0)
  assert by_label(again) == by_label(src) and len(again.skipped_links) == len(skipped)
  record('folders', 'root-is-a-symlink', 'read')
