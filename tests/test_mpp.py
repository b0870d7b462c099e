"""Masked patch prediction (vit_jax/objectives/mpp.py): the paper's corruption within binomial
bounds, the three targets against a NumPy reference, target terms that depend on the corrupted
patches alone, training on a labelled dataset with its labels ignored and on a folder of unlabelled
images, and fine-tuning from the result (the mask embedding and head dropped and named)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.data_helpers import write_image
from tests.sharding_worker import worker_env
from vit_jax.objectives import mpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bounds(p: float, n: int, sigmas: float = 5.0) -> tuple[float, float]:
  """A binomial proportion's interval of `sigmas` standard deviations around p."""
  sd = np.sqrt(p * (1 - p) / n)
  return p - sigmas * sd, p + sigmas * sd


def test_corruption_rate_and_80_10_10_split_lie_within_binomial_bounds():
  draws = [mpp.corrupt(jax.random.PRNGKey(s), (64, 49)) for s in range(20)]
  corrupted = np.concatenate([np.asarray(d['corrupted']).ravel() for d in draws])
  mask = np.concatenate([np.asarray(d['mask']).ravel() for d in draws])
  random = np.concatenate([np.asarray(d['random']).ravel() for d in draws])
  n = corrupted.size
  lo, hi = _bounds(0.5, n)
  assert lo < corrupted.mean() < hi, corrupted.mean()
  k = int(corrupted.sum())
  for got, p in ((mask[corrupted].mean(), 0.8), (random[corrupted].mean(), 0.1),
                 ((~mask & ~random)[corrupted].mean(), 0.1)):
    lo, hi = _bounds(p, k)
    assert lo < got < hi, (got, p)
  assert not (mask & ~corrupted).any() and not (random & ~corrupted).any()
  assert not (mask & random).any()


def test_a_random_replacement_is_another_patch_of_the_same_image_drawn_uniformly():
  n = 9
  draws = [mpp.corrupt(jax.random.PRNGKey(s), (256, n)) for s in range(10)]
  source = np.concatenate([np.asarray(d['source']) for d in draws])
  random = np.concatenate([np.asarray(d['random']) for d in draws])
  own = np.broadcast_to(np.arange(n), source.shape)
  assert np.array_equal(source[~random], own[~random])  # the rest keep their own embedding
  assert (source[random] != own[random]).all()
  offsets = (source[random] - own[random]) % n  # 1..n-1, each 1/(n-1)
  counts = np.bincount(offsets, minlength=n)[1:]
  for c in counts:
    lo, hi = _bounds(1 / (n - 1), offsets.size)
    assert lo < c / offsets.size < hi, counts


def _numpy_targets(images, patch, kind, bits=3, downsize=4):
  b, h, w, c = images.shape
  x01 = (images.astype(np.float64) + 1) / 2
  levels = 2 ** bits
  out = []
  for i in range(b):
    row = []
    for gy in range(h // patch):
      for gx in range(w // patch):
        p = x01[i, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch]
        if kind == 'pixels':
          row.append(images[i, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch].ravel())
          continue
        cells = ([p.mean(axis=(0, 1))] if kind == 'mean_color' else
                 [p[y * (patch // downsize):(y + 1) * (patch // downsize),
                    x * (patch // downsize):(x + 1) * (patch // downsize)].mean(axis=(0, 1))
                  for y in range(downsize) for x in range(downsize)])
        classes = []
        for color in cells:
          q = np.minimum(np.floor(color * levels), levels - 1).astype(int)
          classes.append(int(sum(q[ch] * levels ** (c - 1 - ch) for ch in range(c))))
        row.append(classes[0] if kind == 'mean_color' else classes)
    out.append(row)
  return np.asarray(out)


@pytest.mark.parametrize('kind,channels', [('mean_color', 3), ('mean_color', 1),
                                           ('downsized', 3), ('pixels', 3)])
def test_targets_equal_a_numpy_reference(kind, channels):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 24, channels)).astype(np.float32)
  images[0, :8, :8] = 1.0  # a patch at the top of the range: the last class, not one past it
  got = np.asarray(mpp.targets(jnp.asarray(images), (8, 8), kind))
  want = _numpy_targets(images, 8, kind)
  if kind == 'pixels':
    np.testing.assert_allclose(got, want, rtol=1e-6)
  else:
    assert np.array_equal(got, want)
  if kind == 'mean_color':
    assert got.max() < 8 ** channels and got[0, 0] == 8 ** channels - 1


def test_changing_an_uncorrupted_patch_leaves_the_target_terms_unchanged():
  """The loss reads a target only at corrupted patches, and each patch's target only from its own
  pixels: rewriting the pixels of a patch that was not corrupted changes no term."""
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  draw = mpp.corrupt(jax.random.PRNGKey(7), (3, 4))
  corrupted = np.asarray(draw['corrupted'])
  b, p = np.argwhere(~corrupted)[0]
  changed = images.copy()
  gy, gx = divmod(int(p), 2)
  changed[b, gy * 8:(gy + 1) * 8, gx * 8:(gx + 1) * 8] = -images[b, gy * 8:(gy + 1) * 8,
                                                                  gx * 8:(gx + 1) * 8]
  for kind in mpp.TARGETS:
    before = np.asarray(mpp.targets(jnp.asarray(images), (8, 8), kind))
    after = np.asarray(mpp.targets(jnp.asarray(changed), (8, 8), kind))
    assert np.array_equal(before[corrupted], after[corrupted]), kind
    assert not np.array_equal(before, after), kind  # the change was real


def assert_objective_figure(workdir, out, name):
  """`vit_jax.inspect` of a run draws its objective's figure: 4 columns x the rollout images."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from vit_jax.eval import inspection  # pylint: disable=import-outside-toplevel
  from vit_jax.predict import load_predictor  # pylint: disable=import-outside-toplevel
  predictor = load_predictor(str(workdir))
  images = inspection.dataset_images('digits', predictor.arch, 3)
  report = inspection.inspect_checkpoint(predictor, str(out), dataset_imgs=images,
                                         rollout_count=3)
  assert f'objective_{name}.png' in [f for _, f, _ in report.figures]
  width, height = Image.open(out / f'objective_{name}.png').size
  assert width > height > 300  # four columns, three rows


def _main(workdir, *args, timeout=600):
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *args]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=worker_env())
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('result: ')][-1]
  return json.loads(line[len('result: '):]), out.stderr


TINY = ['--config=configs/quickstart.py:model=ViT-testing', '--config.model.name=ViT-testing',
        '--config.model.patch_size=4', '--config.dataset=digits', '--config.image_size=8',
        '--config.channels=1', '--config.batch_size=32', '--config.total_steps=6',
        '--config.warmup_steps=1', '--config.eval_batch_size=120', '--config.progress=False',
        '--config.augment=none', '--config.log_every=2', '--config.checkpoint_every=6']


def test_mpp_trains_on_digits_labels_ignored_then_fine_tunes_dropping_its_parameters(tmp_path):
  result, _ = _main(tmp_path / 'mpp', *TINY, '--config.objective.name=mpp')
  assert result['step'] == 6 and np.isfinite(result['eval_loss'])
  assert_objective_figure(tmp_path / 'mpp', tmp_path / 'inspect', 'mpp')
  assert 0 <= result['eval_accuracy'] <= 1 and 'eval_top1' not in result
  with open(tmp_path / 'mpp' / 'metrics.jsonl') as f:
    rows = [json.loads(l) for l in f]
  assert all(0.3 < r['corrupted'] < 0.7 for r in rows)  # half the 4 patches, on average
  # The normal fine-tuning path: a classifier from the MPP encoder.
  result, log = _main(tmp_path / 'ft', *TINY, f'--config.pretrained={tmp_path / "mpp"}',
                      '--config.optimizer=sgd', '--config.weight_decay=0.0')
  assert 'eval_top1' in result
  for name in ('objective/mask_embedding', 'objective/head/Dense_0/kernel'):
    assert f'dropped  {name}' in log, name


def test_a_folder_of_unlabelled_images_trains_mpp_and_refuses_classification(tmp_path):
  rng = np.random.default_rng(2)
  root = tmp_path / 'photos'
  root.mkdir()
  for i in range(40):
    write_image(str(root / f'{i:03d}.png'), rng, size=(12, 12))
  args = [a for a in TINY if not a.startswith('--config.dataset')] + [
      f'--config.dataset={root}', '--config.eval_batch_size=4', '--config.batch_size=8']
  result, _ = _main(tmp_path / 'w', *args, '--config.objective.name=mpp')
  assert result['eval_count'] == 4  # the held-out 10% of 40
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "cls"}', *args]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=worker_env())
  assert out.returncode != 0 and 'has no labels' in out.stderr and 'mpp, mae' in out.stderr
