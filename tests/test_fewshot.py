"""vit_jax.eval.fewshot and `python -m vit_jax.fewshot`: the ridge closed form against a reference
solve, 100% on separable features, weighted k-NN on a hand-built case, per-class shot sampling,
pre-logits features of the jitted extractor, the command on a workdir / Google .npz / timm
directory, and the in-training evaluator leaving the trajectory bitwise unchanged."""
from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from vit_jax import fewshot as fewshot_cli
from vit_jax import sharding as sharding_lib
from vit_jax.checkpoints import manager
from vit_jax.checkpoints.npz import write_npz
from vit_jax.data import preprocess
from vit_jax.data.sources import ArraySource, get_source
from vit_jax.eval import fewshot
from vit_jax.families import registry
from vit_jax.families.base import IMAGENET, Architecture
from vit_jax.formats import timm as timm_format
from vit_jax.models import params as params_lib


def _init(model, size=16):
  """Parameters of a fresh `model` (jitted: eager init compiles every small op on its own)."""
  x = np.zeros((1, size, size, 3), np.float32)
  return jax.device_get(jax.jit(lambda: model.init(jax.random.PRNGKey(0), x)['params'])())


# ------------------------------------------------------------------------------ closed forms

def _reference_ridge(x, labels, num_classes, l2):
  """The system spelled out independently: whiten, a bias column of 100, ±1 targets, primal form."""
  x = np.asarray(x, np.float64)
  z = (x - np.mean(x, 0)) / (np.std(x, 0) + 1e-5)
  z = np.hstack([z, 100.0 * np.ones((len(z), 1))])
  y = -np.ones((len(x), num_classes))
  y[np.arange(len(x)), labels] = 1.0
  return np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ y)


@pytest.mark.parametrize('n,d', [(12, 40), (90, 20)])  # dual (N < D) and primal forms
def test_ridge_equals_a_reference_solve(n, d):
  rng = np.random.default_rng(n)
  x = (3.0 + 2.0 * rng.normal(size=(n, d))).astype(np.float32)
  labels = np.arange(n) % 4
  for l2 in (1024.0, 0.5):
    model = fewshot.ridge_fit(x, labels, 4, l2)
    want = _reference_ridge(x, labels, 4, l2)
    assert_close_to_scale(model.weights, want, 1e-5, f'weights n={n} d={d} l2={l2}')
    test = rng.normal(size=(7, d))
    z = np.hstack([(test - x.mean(0)) / (x.std(0) + 1e-5), 100.0 * np.ones((7, 1))])
    assert_close_to_scale(fewshot.ridge_scores(model, test), z @ want, 1e-5, 'scores')


def test_ridge_reaches_100_percent_on_separable_features():
  rng = np.random.default_rng(0)
  centres = 4.0 * rng.normal(size=(10, 48))
  def draw(per_class, noise=0.5):
    labels = np.repeat(np.arange(10), per_class)
    return centres[labels] + noise * rng.normal(size=(len(labels), 48)), labels
  test_x, test_y = draw(50)
  for shots in (1, 5, 25):  # 10 and 50 examples (dual), 250 (primal)
    x, y = draw(shots)
    assert fewshot.accuracy('ridge', x, y, test_x, test_y, 10) == 1.0, shots
  # Overlapping classes are not all right: the check above can fail.
  x, y = draw(5, noise=8.0)
  test_x, test_y = draw(50, noise=8.0)
  assert 0.1 < fewshot.accuracy('ridge', x, y, test_x, test_y, 10) < 0.9


def test_knn_is_a_similarity_weighted_vote_on_unit_vectors():
  deg = lambda a: np.array([np.cos(np.radians(a)), np.sin(np.radians(a))])
  # Class 1: one example at 90 degrees; class 0: two at 30 degrees, one (far longer) at 0.
  train = np.stack([deg(90), deg(30), deg(30), 50 * deg(0)])
  labels = np.array([1, 0, 0, 0])
  query = np.stack([deg(88), 1e-3 * deg(28), deg(-10)])
  # k=3 at 88 degrees: a majority vote says 0 (two of three), the weighted vote exp(cos / 0.07)
  # says 1 (cos 1.0 against 0.53 twice). Lengths do not matter (L2-normalised).
  scores = fewshot.knn_scores(train, labels, query, 2, k=3)
  assert list(np.argmax(scores, 1)) == [1, 0, 0]
  want = np.exp((np.cos(np.radians(2)) - 1) / 0.07)
  assert scores[0, 1] == pytest.approx(want, rel=1e-9)
  # k larger than the shots: every training example votes.
  big = fewshot.knn_scores(train, labels, query, 2, k=20)
  assert np.all(big[:, 0] > 0) and np.all(big[:, 1] > 0)
  with pytest.raises(ValueError, match='method'):
    fewshot.accuracy('svm', train, labels, query, labels[:3], 2)


# -------------------------------------------------------------------------------------- shots

def test_shots_exactly_k_per_class_nested_and_deterministic_by_seed():
  labels = np.random.default_rng(1).integers(0, 5, 300)
  draw = fewshot.sample_shots(labels, 5, [7, 1, 3], seed=3)
  assert sorted(draw) == [1, 3, 7]
  for k, idx in draw.items():
    assert len(idx) == 5 * k and len(set(idx.tolist())) == 5 * k
    np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(5), k))  # class-major
  # k-shot is the first k of one order per class: nested, and independent of the shots asked.
  np.testing.assert_array_equal(draw[3].reshape(5, 3)[:, :1].ravel(), draw[1])
  np.testing.assert_array_equal(fewshot.sample_shots(labels, 5, [3], seed=3)[3], draw[3])
  again = fewshot.sample_shots(labels, 5, [7, 1, 3], seed=3)
  assert all(np.array_equal(again[k], draw[k]) for k in draw)
  other = fewshot.sample_shots(labels, 5, [7], seed=4)[7]
  assert not np.array_equal(other, draw[7])
  smallest = int(np.argmin(np.bincount(labels)))
  with pytest.raises(ValueError, match=rf'class {smallest} has \d+ .* fewer than 500 shots'):
    fewshot.sample_shots(labels, 5, [500], seed=0)


def test_task_featurises_only_the_drawn_training_examples():
  task = fewshot.FewshotTask('digits', shots=[1, 5], seeds=2)
  assert len(task.train) <= 2 * 10 * 5 and len(task.test) == len(get_source('digits', split='test'))
  for (seed, k), pos in task.picks.items():
    np.testing.assert_array_equal(np.asarray(task.train.labels)[pos], np.repeat(np.arange(10), k))


# ----------------------------------------------------------------------------------- features

@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp('fewshot')
  cfg = dict(registry.get_model_config('ViT-testing'))
  params = _init(registry.create_model(cfg, 10, head_zeroinit=False))
  arch = Architecture(cfg, 10, (16, 16), 3)
  manager.save_params(root / 'run', params, {'architecture': arch.to_meta()})
  flat = params_lib.flatten_numpy(params)
  write_npz(root / 'google.npz', flat)
  # Written by the project's timm writer, which tests/test_families_timm.py checks against timm.
  timm_arch = Architecture(cfg, 10, (16, 16), 3, 'vit', *IMAGENET)
  timm_format.write_timm(root / 'timm', flat, timm_arch)
  return root, params


def test_features_are_the_models_pre_logits(checkpoints):
  """Headless features of the full tree (head dropped; ImageNet mean/std applied to the loader's
  [-1, 1] images, as for a timm checkpoint) equal the model's own pre_logits output."""
  name = 'ViT-testing'
  arch = Architecture(dict(registry.get_model_config(name)), 10, (16, 16), 3, 'vit', *IMAGENET)
  model, params = arch.create_model(), checkpoints[1]
  src = get_source('digits', split='test')
  src = ArraySource(src.images[:10], src.labels[:10])
  mesh = sharding_lib.make_mesh((('data', -1),))
  rep = jax.tree.map(lambda _: sharding_lib.replicated(mesh), params)
  fn = fewshot.make_features_fn(model, mesh, rep, head_prefixes=arch.get_family().head_prefixes,
                                input_fn=fewshot.input_fn_for(arch))
  feats, labels = fewshot.extract_features(fn, params, src, image_size=(16, 16), channels=3,
                                           batch_size=4)
  assert feats.shape == (10, 32) and feats.dtype == np.float32
  np.testing.assert_array_equal(labels, src.labels)
  pixels = preprocess.normalize(preprocess.eval_batch(src.images, (16, 16), 3), arch.mean, arch.std)
  pre_logits = jax.jit(lambda p, x: model.apply({'params': p}, x, return_aux=True)[1]['pre_logits'])
  assert_close_to_scale(feats, pre_logits(params, pixels), 1e-5, name)


# ---------------------------------------------------------------------------------------- CLI

def _cli(capsys, tmp_path, *args):
  out = tmp_path / 'r.json'
  rc = fewshot_cli.main(['--dataset', 'digits', '--shots', '1,2', '--seeds', '2', '--json_out',
                         str(out), *args])
  text = capsys.readouterr().out
  assert rc == 0, text
  return text, json.loads(out.read_text())['accuracy']


def test_cli_on_a_workdir_a_google_npz_and_a_timm_directory(checkpoints, tmp_path, capsys):
  text, run = _cli(capsys, tmp_path, '--checkpoint', str(checkpoints[0] / 'run'))
  last = text.strip().splitlines()[-1]
  assert re.fullmatch(r'fewshot: digits 2-shot \d+\.\d\d%', last), last
  assert sorted(run) == ['1', '2'] and all(len(a) == 2 and 0 < min(a) for a in run.values())
  assert f'{np.mean(run["2"]):.2%}' in last
  # The same parameters and normalisation in Google's layout give the same numbers.
  _, npz = _cli(capsys, tmp_path, '--checkpoint', str(checkpoints[0] / 'google.npz'),
                '--model', 'ViT-testing')
  assert npz == run
  text, timm = _cli(capsys, tmp_path, '--checkpoint', str(checkpoints[0] / 'timm'),
                    '--method', 'knn')
  assert 'k-NN, k 20' in text and all(0 < min(a) <= max(a) <= 1 for a in timm.values())


def test_cli_random_init_and_errors(checkpoints, tmp_path, capsys):
  text, _ = _cli(capsys, tmp_path, '--checkpoint', str(checkpoints[0] / 'run'), '--random_init')
  assert 'random init' in text
  rc = fewshot_cli.main(['--checkpoint', str(checkpoints[0] / 'run'), '--dataset', 'digits',
                         '--shots', '500'])
  assert rc == 2 and 'fewer than 500 shots' in capsys.readouterr().err
  assert fewshot_cli.headline_shots([1, 5, 10, 25]) == 10
  assert fewshot_cli.headline_shots([25, 50]) == 25


# -------------------------------------------------------------------------------- in training

def test_in_training_evaluator_leaves_the_trajectory_bitwise_unchanged(tmp_path):
  from tests.test_train import tiny_config
  from vit_jax.train import loop, validate
  runs = {}
  for name, datasets in (('plain', ()), ('fewshot', ('digits',))):
    config = tiny_config(total_steps=6, eval_every=3, log_every=3, checkpoint_every=6)
    config.fewshot.datasets, config.fewshot.shots, config.fewshot.seeds = datasets, (1, 5), 2
    validate.validate(config)
    loop.train_and_evaluate(config, str(tmp_path / name))
    params, meta = manager.load_params(str(tmp_path / name))
    assert meta['step'] == 6
    rows = [json.loads(l) for l in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
    runs[name] = (params_lib.flatten_numpy(params), rows)
  plain, with_fs = runs['plain'][0], runs['fewshot'][0]
  assert sorted(plain) == sorted(with_fs)
  assert all(plain[k].tobytes() == with_fs[k].tobytes() for k in plain)
  rows = runs['fewshot'][1]
  assert [r['step'] for r in rows if 'fewshot/digits/5shot' in r] == [3, 6]
  assert all(0 < r['fewshot/digits/1shot'] <= 1 and r['fewshot/seconds'] > 0
             for r in rows if 'fewshot/digits/5shot' in r)
  assert not any(k.startswith('fewshot/') for r in runs['plain'][1] for k in r)
  assert [r['loss'] for r in rows] == [r['loss'] for r in runs['plain'][1]]


def test_config_block_is_validated():
  from tests.test_train import tiny_config
  from vit_jax.train import validate
  config = tiny_config()
  config.fewshot.datasets = ('digits',)
  config.fewshot.method = 'svm'
  with pytest.raises(validate.ConfigError, match='fewshot.method'):
    validate.validate(config)
  config.fewshot.method, config.fewshot.shots = 'ridge', (0, 5)
  with pytest.raises(validate.ConfigError, match='fewshot.shots'):
    validate.validate(config)
  assert fewshot.datasets_of(('digits,fashion_mnist',)) == ['digits', 'fashion_mnist']
  assert fewshot.metric_name('folder:/data/my flowers/') == 'my_flowers'
