"""`python -m vit_jax.main` keeps the README's promises about transfer and data, end to end:

- a folder run saves its class names, counts a corrupt image in `skipped_images` of metrics.jsonl,
  and under `--config.accum_steps` the model sees micro-batches (recorded by tests/main_probe.py);
- the quickstart's stage 2 (`configs/quickstart_digits.py:pretrained=WORKDIR`) starts from a real
  run's workdir;
- `--config.pretrained` takes a timm and a Hugging Face directory, and `--config.posemb_resize`
  decides how their position embeddings are resampled (bilinear by default, bicubic on request;
  another value is refused).

Each test runs the trainer in a subprocess on tiny models (a few steps): `slow`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data_helpers import make_folder
from tests.sharding_worker import worker_env
from tests.test_npz import make_params

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FOLDER_CLASSES = ['cat', 'dog', 'fox']
# A ViT-testing at patch 2 on 8x8 grey images; the quickstart's recipe (gap, sincos2d, Adam).
STAGE1 = ['--config=configs/quickstart.py:model=ViT-testing', '--config.model.patch_size=2',
          '--config.image_size=8', '--config.channels=1', '--config.batch_size=8',
          '--config.accum_steps=2', '--config.total_steps=6', '--config.warmup_steps=1',
          '--config.eval_every=6', '--config.checkpoint_every=6', '--config.log_every=3',
          '--config.eval_batch_size=12', '--config.augment=resize', '--config.progress=False']


def _env():
  return worker_env()  # one CPU device, whatever the caller's XLA_FLAGS


def result_of(out):
  line = [l for l in out.stdout.splitlines() if l.startswith('result: ')][-1]
  return json.loads(line[len('result: '):])


def _run(module, workdir, *args, timeout=600):
  return subprocess.run([sys.executable, '-m', module, f'--workdir={workdir}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=_env())


def _ok(out):
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v, np.float64)
  return out


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """Stage 1: a folder dataset (3 classes, 4 images each in train/ and test/, 12x12 files) with one
  corrupt file in train/dog, trained 6 steps of 8 images in 2 micro-batches of 4."""
  root = tmp_path_factory.mktemp('pets')
  make_folder(str(root), classes=FOLDER_CLASSES, per_class=4, size=(12, 12))
  (root / 'train' / 'dog' / 'zz_broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' * 8)
  workdir = tmp_path_factory.mktemp('stage1') / 'w'
  out = _ok(_run('tests.main_probe', workdir, *STAGE1, f'--config.dataset={root}'))
  return workdir, out


def test_folder_run_saves_class_names_counts_skipped_images_and_accumulates(folder_run):
  workdir, out = folder_run
  # batch 8 in accum_steps=2: the model is applied to micro-batches of 4 inside the step.
  assert 'probe: train-step image shapes [(4, 8, 8, 1)]' in out.stderr, out.stderr[-3000:]
  from vit_jax.checkpoints import read_checkpoint
  assert read_checkpoint(workdir).class_names == FOLDER_CLASSES   # the folder names, saved
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  # skipped_images counts distinct unreadable files: the one corrupt file, met in the first epoch
  # (6 steps x 8 images of 13 files) and then on every later one without being counted again.
  assert [r['skipped_images'] for r in rows] == [1, 1], rows
  assert 'zz_broken.jpg' in out.stderr                        # the warning names the file
  res = result_of(out)
  assert res['step'] == 6 and res['eval_count'] == 12 and np.isfinite(res['train_loss'])


def test_quickstart_stage2_transfers_from_the_run_workdir(folder_run, tmp_path):
  """The quickstart's second stage, as scripts/quickstart.sh runs it, on the stage-1 workdir: new
  dataset (digits), new head (3 -> 10 classes), new image size (8 -> 12: a fixed sincos grid)."""
  stage1, _ = folder_run
  w = tmp_path / 'ft'
  out = _ok(_run('vit_jax.main', w,
                 f'--config=configs/quickstart_digits.py:pretrained={stage1},model=ViT-testing',
                 '--config.model.patch_size=2', '--config.image_size=12', '--config.batch_size=16',
                 '--config.total_steps=4', '--config.warmup_steps=1', '--config.eval_every=4',
                 '--config.checkpoint_every=4', '--config.log_every=2', '--config.progress=False'))
  assert f'from {stage1} (orbax)' in out.stderr, out.stderr[-3000:]
  assert 'added    head/kernel' in out.stderr and 'added    head/bias' in out.stderr
  res = result_of(out)
  assert res['step'] == 4 and res['eval_count'] == 359
  from vit_jax.checkpoints import read_checkpoint
  from vit_jax.checkpoints.manager import load_params
  assert read_checkpoint(w).class_names == [str(k) for k in range(10)]
  before = _flat(load_params(stage1)[0])
  after = _flat(load_params(w)[0])
  body = [k for k in before if not k.startswith('head/')]
  assert body and set(body) <= set(after)
  # SGD (momentum 0.9, updates clipped at norm 1, lr 0.1 from step 0) moves the whole tree by at
  # most 0.1 x (1 + 1.9 + 2.71 + 3.44) = 0.9 in 4 steps; the body's norm is ~20. A model that did
  # not start from stage 1 would be a fresh initialisation, ~1.4 x the norm away.
  moved = np.sqrt(sum(np.sum((after[k] - before[k]) ** 2) for k in body))
  norm = np.sqrt(sum(np.sum(before[k] ** 2) for k in body))
  assert moved <= 0.91 and norm > 5, (moved, norm)


@pytest.mark.parametrize('fmt,resize', [('timm', 'bicubic'), ('hf', None)])
def test_pretrained_timm_and_hf_directories_through_the_trainer(tmp_path, fmt, resize):
  """A timm / Hugging Face directory of a 16x16 ViT (4x4 grid, 5 classes, 3 channels) starts a
  digits run at 24x24 (6x6 grid), 10 classes, 1 channel. At lr 1e-9 the saved parameters are the
  file's, adapted: the body as written, the patch kernel summed over colour, the position
  embeddings resampled as `--config.posemb_resize` asks (bilinear when unset)."""
  from vit_jax.checkpoints.manager import load_params
  from vit_jax.families import resample
  from vit_jax.families.vit import FAMILY as VIT
  from vit_jax.formats import hf, timm
  flat = make_params('vit_jax', seed=31)
  arch = VIT.infer(flat, image_size=(16, 16))
  src = tmp_path / fmt
  (timm.write_timm if fmt == 'timm' else hf.write_hf)(src, flat, arch)
  w = tmp_path / 'w'
  args = ['--config=configs/quickstart.py:model=ViT-testing', '--config.model.classifier=token',
          '--config.model.posemb=learned', '--config.dataset=digits', '--config.image_size=24',
          '--config.channels=1', '--config.batch_size=8', '--config.total_steps=1',
          '--config.warmup_steps=1', '--config.base_lr=1e-9', '--config.eval_every=0',
          '--config.checkpoint_every=1', '--config.augment=resize', '--config.progress=False',
          f'--config.pretrained={src}'] + ([f'--config.posemb_resize={resize}'] if resize else [])
  out = _ok(_run('vit_jax.main', w, *args))
  method = resize or 'bilinear'
  assert f'({fmt})' in out.stderr and f'grid 4x4 -> 6x6 ({method})' in out.stderr, out.stderr[-3000:]
  got = _flat(load_params(w)[0])
  pe = 'Transformer/posembed_input/pos_embedding'
  want = {k: np.asarray(v, np.float64) for k, v in flat.items() if not k.startswith('head/')}
  want['embedding/kernel'] = want['embedding/kernel'].sum(axis=2, keepdims=True)
  want[pe] = resample.resample_posemb(flat[pe], (6, 6), num_prefix=1, old_grid=(4, 4),
                                      method=method)
  # One Adam step of lr 1e-9 moves a parameter by ~1e-9; the arrays are N(0, 0.3) (scale ~1), so
  # 1e-6 of the tree's scale is rounding and that step, and far below any wrong value.
  scale = max(np.abs(v).max() for v in want.values())
  for k, v in want.items():
    assert got[k].shape == v.shape, k
    assert np.abs(got[k] - v).max() <= 1e-6 * scale, (k, np.abs(got[k] - v).max())
  other = resample.resample_posemb(flat[pe], (6, 6), num_prefix=1, old_grid=(4, 4),
                                   method='bicubic' if method == 'bilinear' else 'bilinear')
  assert np.abs(other - want[pe]).max() > 1e-2 * scale     # the option changes the result
  assert got['head/kernel'].shape == (32, 10)


def test_posemb_resize_value_is_checked(tmp_path):
  out = _run('vit_jax.main', tmp_path / 'w', '--config=configs/quickstart.py:model=ViT-testing',
             '--config.dataset=digits', '--config.posemb_resize=nearest', timeout=300)
  assert out.returncode != 0 and 'posemb_resize' in out.stderr and 'bicubic' in out.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()
