"""vit_jax.eval.attention (rollout, attention distance, posemb similarity, patch PCA), the models'
attention maps, and `python -m vit_jax.inspect` on a run workdir, a Google .npz and a timm directory."""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from tests.numerics import assert_close_to_scale
from vit_jax import inspect as inspect_cli
from vit_jax.checkpoints import manager
from vit_jax.checkpoints.npz import write_npz
from vit_jax.convert import __main__ as convert_cli
from vit_jax.eval import attention as A
from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.models import params as params_lib
from vit_jax.models.vit import sincos_2d

FIGURES = ('attention_distance.png', 'token_shares.png', 'posemb_similarity.png',
           'posemb_similarity_sincos2d.png', 'patch_filters.png')


def _stochastic(rng, shape):
  w = rng.random(shape) ** 3
  return w / w.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------- the math

def test_rollout_equals_an_independent_per_head_computation():
  rng = np.random.default_rng(0)
  layers, b, heads, n = 3, 2, 4, 5
  attn = _stochastic(rng, (layers, b, heads, n, n))
  got = A.rollout(attn)
  for i in range(b):
    want = np.eye(n)
    for l in range(layers):
      per_head = [(attn[l, i, h] + np.eye(n)) / (attn[l, i, h] + np.eye(n)).sum(1, keepdims=True)
                  for h in range(heads)]
      want = (sum(per_head) / heads) @ want
    np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)
  # One layer of attention to token 2 only: rollout = half identity, half "everything from 2".
  one = np.zeros((1, 1, 1, n, n))
  one[..., 2] = 1.0
  np.testing.assert_allclose(A.rollout(one)[0], 0.5 * np.eye(n) + 0.5 * one[0, 0, 0], atol=1e-12)


def test_output_token_map_reads_the_class_token_or_the_mean():
  m = np.arange(25, dtype=float).reshape(5, 5)
  got = A.output_token_map(m, 1, (2, 2))
  np.testing.assert_allclose(got, (m[0, 1:] / m[0, 1:].sum()).reshape(2, 2))
  got = A.output_token_map(m[1:, 1:], 0, (2, 2))
  want = m[1:, 1:].mean(0)
  np.testing.assert_allclose(got, (want / want.sum()).reshape(2, 2))
  # A pooled model with a prefix token it does not read (a register; EVA-02's class token): the
  # patch queries' rows, averaged.
  got = A.output_token_map(m, 1, (2, 2), class_token=False)
  want = m[1:, 1:].mean(0)
  np.testing.assert_allclose(got, (want / want.sum()).reshape(2, 2))
  from vit_jax.families import registry
  from vit_jax.families.base import Architecture
  for name, reads in (('EVA-testing', False), ('ViT-testing', True)):
    family = registry.family_of(name)
    arch = Architecture(dict(registry.get_model_config(name)), 3, (16, 16), 3, family.name)
    assert family.reads_class_token(arch) is reads, name


def test_attention_distance_identity_and_uniform():
  grid, patch = (3, 4), (16, 8)
  p = grid[0] * grid[1]
  for prefix in (0, 2):
    eye = np.broadcast_to(np.eye(prefix + p), (2, 3, prefix + p, prefix + p))
    np.testing.assert_allclose(A.attention_distance(eye, prefix, grid, patch), 0.0, atol=1e-12)
    uniform = np.full((2, 3, prefix + p, prefix + p), 1.0 / (prefix + p))
    coords = [(r * 16.0, c * 8.0) for r in range(3) for c in range(4)]
    want = np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords])
    np.testing.assert_allclose(A.attention_distance(uniform, prefix, grid, patch), want, rtol=1e-12)
    np.testing.assert_allclose(A.prefix_mass(uniform, prefix), prefix / (prefix + p), rtol=1e-12)
  # 2x2 grid of 16-px patches: each query sees itself (0), two neighbours (16) and a diagonal.
  assert A.uniform_distance((2, 2), (16, 16)) == pytest.approx((32 + 16 * np.sqrt(2)) / 4)


def test_posemb_similarity_learned_and_sincos2d():
  rng = np.random.default_rng(1)
  sim = A.posemb_similarity(rng.normal(size=(3, 5, 16)))
  flat = sim.reshape(15, 15)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-12)
  np.testing.assert_allclose(flat, flat.T, atol=1e-12)
  assert np.abs(flat).max() <= 1 + 1e-12
  g = 6
  sim = A.posemb_similarity(sincos_2d(g, g, 64)[0].reshape(g, g, 64))
  off = sim.reshape(g * g, g * g) + np.eye(g * g) * -9
  assert off.max() < 1 - 1e-3                         # the peak is the patch itself, alone
  for i, j in ((0, 0), (2, 3), (5, 5)):
    row, col = sim[i, j, i], sim[i, j, :, j]
    for line, k in ((row, j), (col, i)):
      near = line[max(0, k - 3):k + 1][::-1], line[k:k + 4]
      for side in near:                                 # falls for 3 steps away from the patch
        assert np.all(np.diff(side) < 0), side
  levels, mean = A.similarity_by_distance(sim)
  assert levels[0] == 0 and mean[0] == pytest.approx(1.0)
  assert mean[1] > mean[2:].max()
  assert np.corrcoef(levels, mean)[0, 1] < -0.9


def test_patch_components_recover_a_planted_pattern():
  rng = np.random.default_rng(2)
  pattern = rng.normal(size=(4, 4, 3))
  pattern /= np.linalg.norm(pattern)
  kernel = pattern[..., None] * rng.normal(size=64) * 5 + 0.01 * rng.normal(size=(4, 4, 3, 64))
  comps, explained = A.patch_components(kernel, k=5)
  assert comps.shape == (5, 4, 4, 3) and explained[0] > 0.95
  assert abs(np.sum(comps[0] * pattern)) > 0.999
  tiles = A.component_tiles(comps)
  assert tiles.min() >= 0 and tiles.max() <= 1 and np.isclose(np.abs(tiles - 0.5).max(), 0.5)


# ------------------------------------------------------------------------ the model's attention

def _layernorm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def test_model_attention_rows_and_a_hand_computed_first_layer():
  cfg = dict(registry.get_model_config('ViT-testing'))
  arch = Architecture(cfg, 3, (16, 16), 3)
  family = arch.get_family()
  params = jax.jit(arch.create_model().init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))
  params = params['params']
  params = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  attn = np.asarray(jax.jit(family.attention_fn(arch))(params, x)[1])
  assert attn.shape == (2, 2, 2, 17, 17)               # [L, B, heads, 1 + 4*4, 1 + 4*4]
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert family.token_layout(arch) == (1, (4, 4), (4, 4))
  # By hand: patches @ kernel, class token, position table, LayerNorm_0, softmax(q k^T / sqrt(K)).
  patches = x.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  tokens = patches @ params['embedding']['kernel'].reshape(48, 32) + params['embedding']['bias']
  tokens = np.concatenate([np.broadcast_to(params['cls'], (2, 1, 32)), tokens], 1)
  tokens = tokens + params['Transformer']['posembed_input']['pos_embedding']
  block = params['Transformer']['encoderblock_0']
  y = _layernorm(tokens, block['LayerNorm_0'])
  mha = block['MultiHeadDotProductAttention_1']
  q = np.einsum('btd,dhk->bhtk', y, mha['query']['kernel']) + mha['query']['bias'][:, None]
  k = np.einsum('btd,dhk->bhtk', y, mha['key']['kernel']) + mha['key']['bias'][:, None]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(16)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(attn[0], want, atol=1e-5)
  # Scanned (`nn.scan` stacks the maps), rematerialised, configured for a fused kernel: the same.
  other = Architecture({**cfg, 'scan': True, 'remat': True, 'attention_impl': 'xla'}, 3, (16, 16), 3)
  p = family.to_module_layout(params, other.model_config)
  np.testing.assert_allclose(np.asarray(jax.jit(family.attention_fn(other))(p, x)[1]), attn,
                             atol=1e-6)


def test_families_without_an_analysis_say_so():
  for name, what in (('mixer', 'MLPs'), ('swin', 'windows'), ('pvt', 'spatially reduced')):
    fam = registry.get_family(name)
    arch = Architecture(dict(registry.get_model_config(fam.test_model)), 3,
                        (fam.test_image_size,) * 2, 3, family=name)
    for hook in (lambda: fam.token_layout(arch), lambda: fam.attention_fn(arch),
                 lambda: fam.position_table({}, arch)):
      with pytest.raises(NotImplementedError, match=f'the {name} family: .*{what}'):
        hook()
  hybrid = registry.get_family('hybrid')
  with pytest.raises(NotImplementedError, match="hybrid family: .*ResNet's feature map"):
    hybrid.patch_filters({}, None)
  arch = Architecture(dict(registry.get_model_config('R+ViT-testing')), 3, (32, 32), 3,
                      family='hybrid')
  assert hybrid.token_layout(arch) == (1, (4, 4), (8, 8))   # tokens of the effective 8-px patch


# ------------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp('inspect')
  cfg = dict(registry.get_model_config('ViT-testing'))
  model = registry.create_model(cfg, 3, head_zeroinit=False)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  params = jax.tree.map(np.asarray, params['params'])
  arch = Architecture(cfg, 3, (16, 16), 3)
  manager.save_params(root / 'run', params, {'architecture': arch.to_meta(),
                                             'class_names': ['ant', 'bee', 'cat']})
  write_npz(root / 'google.npz', params_lib.flatten(params))
  assert convert_cli.main(['--input', str(root / 'run'), '--to', 'timm',
                           '--output', str(root / 'timm')]) == 0
  rng = np.random.default_rng(0)
  files = []
  for name in ('one.png', 'two.png'):
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / name)
    files.append(str(root / name))
  return root, files


_DISTANCES: dict[str, np.ndarray] = {}


@pytest.mark.parametrize('source', ['run', 'npz', 'timm'])
def test_cli_writes_every_figure_and_an_index(checkpoints, source, tmp_path, capsys):
  """Rollout of IMAGES (run, npz) or of the dataset's first images (timm); distance over digits."""
  root, files = checkpoints
  path = {'run': root / 'run', 'npz': root / 'google.npz', 'timm': root / 'timm'}[source]
  extra = ['--model', 'ViT-testing'] if source == 'npz' else []
  images = {'run': files, 'npz': files[:1], 'timm': ['--rollout_images', '1']}[source]
  sinks = ['--sinks', '--sink_factor', '2.5'] if source == 'run' else []
  out = tmp_path / 'out'
  assert inspect_cli.main(['--checkpoint', str(path), '--out', str(out), *images, *extra,
                           '--dataset', 'digits', '--num_images', '6', *sinks]) == 0
  rollouts = {'run': ['rollout_00_one.png', 'rollout_01_two.png', 'sinks.png'],
              'npz': ['rollout_00_one.png'], 'timm': ['rollout_00_digits_test_0.png']}[source]
  text = capsys.readouterr().out
  assert text.strip().splitlines()[-1] == (f'inspect: {len(rollouts) + len(FIGURES)} figures -> '
                                           f'{out / "index.html"}')
  pngs = sorted(f for f in os.listdir(out) if f.endswith('.png'))
  assert pngs == sorted(rollouts + list(FIGURES))
  for f in pngs:
    with Image.open(out / f) as im:
      assert im.size[0] > 200 and im.size[1] > 150
  page = (out / 'index.html').read_text()
  assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
  assert 'attention_distance.json' in page and str(path) in page
  if sinks:
    sink = json.loads((out / 'sinks.json').read_text())
    assert sink['num_images'] == 6 and sink['factor'] == 2.5 and sink['prefix_tokens'] == ['class']
  shares = json.loads((out / 'token_shares.json').read_text())
  assert shares['tokens'] == ['class', 'patches'] and shares['reader'] == 'class token'
  np.testing.assert_allclose(np.sum(shares['share_per_layer'], axis=1), 1.0, atol=1e-4)
  dist = json.loads((out / 'attention_distance.json').read_text())
  d = np.array(dist['mean_distance_px'])
  assert dist['num_images'] == 6 and dist['images'][0] == 'digits:test[0]'
  assert d.shape == (2, 2) and dist['grid'] == [4, 4] and dist['patch_size_px'] == [4, 4]
  assert np.all(d > 0) and np.all(d < np.hypot(12, 12))
  # The same parameters in three formats, the same images: the same numbers.
  # Distances of up to ~17 px, from float32 attention of the same parameters: 1e-5 of their scale
  # (measured: equal).
  for other in _DISTANCES.values():
    assert_close_to_scale(d, other, rtol=1e-5, what='mean distance')
  _DISTANCES[source] = d


def test_cli_refuses_a_mixer_and_missing_images(checkpoints, tmp_path, capsys):
  root, files = checkpoints
  cfg = dict(registry.get_model_config('Mixer-testing'))
  params = jax.jit(registry.create_model(cfg, 3).init)(jax.random.PRNGKey(0),
                                                       np.zeros((1, 16, 16, 3), np.float32))
  write_npz(tmp_path / 'mixer.npz', params_lib.flatten(params['params']))
  out = tmp_path / 'out'
  assert inspect_cli.main(['--checkpoint', str(tmp_path / 'mixer.npz'), '--model', 'Mixer-testing',
                           '--out', str(out), *files]) == 2
  err = capsys.readouterr().err
  assert 'the mixer family' in err and 'no attention maps' in err
  assert not out.exists()
  assert inspect_cli.main(['--checkpoint', str(root / 'run'), '--out', str(out)]) == 2
  assert 'give image files' in capsys.readouterr().err
