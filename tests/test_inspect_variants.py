"""Few-shot (`vit_jax.eval.fewshot`) and inspection (`vit_jax.eval.attention`, `inspection`) on each
issue-M architecture, shrunk to a tiny model of the same class (the registered fields with width 32,
2 heads, 2 blocks, MLP 64, patch 4, at 16x16: a 4x4 grid): the maps are over prefix + patch tokens
with rows summing to 1, the prefix tokens (class, registers) are named and reported apart, and
the features and the sink measurement have the shapes the family promises."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from vit_jax import sharding as sharding_lib
from vit_jax.data.sources import ArraySource
from vit_jax.eval import attention as A
from vit_jax.eval import fewshot
from vit_jax.eval import inspection
from vit_jax.eval import sinks
from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.models import params as params_lib
from vit_jax.predict import Predictor

# name -> (prefix token names, whether the classifier reads the class token, position table kind
# or None where the family has no absolute table)
VARIANTS = {
    'DeiT3-S_16': (['class'], True, 'learned'),
    'DeiT3-B_16': (['class'], True, 'learned'),
    'DINOv2-S_14': (['class'], True, 'learned'),
    'DINOv2-S_14-reg4': (['class'] + [f'register {i}' for i in range(1, 5)], True, 'learned'),
    'DINOv2-B_14-reg4': (['class'] + [f'register {i}' for i in range(1, 5)], True, 'learned'),
    'SigLIP-B_16': ([], False, 'learned'),
    'SigLIP-B_16-gap': ([], False, 'learned'),
    'ViT-Little_16-reg4-gap': ([f'register {i}' for i in range(1, 5)], False, 'learned'),
    'EVA02-Ti_14': (['class'], False, 'learned'),
    'EVA02-S_14': (['class'], False, 'learned'),
    'ViT-B_16-rope-reg1-gap': (['register 1'], False, None),
    'BEiTv2-B_16': (['class'], False, None),
}
# Shrunk, these differ from the model above them only in size fields: the same tiny model.
SAME_CLASS = {'DeiT3-B_16': 'DeiT3-S_16', 'DINOv2-B_14-reg4': 'DINOv2-S_14-reg4',
              'EVA02-S_14': 'EVA02-Ti_14'}
CLASSES = sorted(set(VARIANTS) - set(SAME_CLASS))
SIZE = 16
GRID = (4, 4)


def tiny(name: str) -> Architecture:
  family = registry.family_of(name)
  cfg = {k: v for k, v in registry.get_model_config(name).items() if k != 'family'}
  cfg.update(hidden_size=32, num_heads=2, num_layers=2, mlp_dim=64, patch_size=4)
  return Architecture(cfg, 3, (SIZE, SIZE), 3, family.name)


def _init(arch):
  model = arch.create_model()
  x = np.zeros((1, SIZE, SIZE, 3), np.float32)
  return jax.device_get(jax.jit(lambda: model.init(jax.random.PRNGKey(0), x)['params'])())


def _images(n=6, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_every_architecture_class_is_covered():
  fields = lambda name: {k: v for k, v in tiny(name).model_config.items() if k != 'name'}
  for name, same in SAME_CLASS.items():
    assert fields(name) == fields(same) and VARIANTS[name] == VARIANTS[same], name


def test_prefix_names_of_a_distilled_model_with_registers():
  family = registry.get_family('deit')
  fields = dict(registry.get_model_config('DeiT-testing'))
  arch = Architecture(fields, 3, (SIZE, SIZE), 3, 'deit')
  assert family.prefix_names(arch) == ['class', 'distillation']
  arch = Architecture({**fields, 'num_registers': 2}, 3, (SIZE, SIZE), 3, 'deit')
  assert family.token_layout(arch)[0] == 4
  assert family.prefix_names(arch) == ['class', 'distillation', 'register 1', 'register 2']


@pytest.mark.parametrize('name', CLASSES)
def test_attention_analyses_sinks_and_fewshot_features(name):
  """Attention maps, rollout, prefix/patch shares, distance, tables, the sink numbers; then the
  few-shot features of the same parameters (`_fewshot`)."""
  names, reads_class, table_kind = VARIANTS[name]
  arch = tiny(name)
  family = arch.get_family()
  params = _init(arch)
  prefix, grid, patch_hw = family.token_layout(arch)
  assert (prefix, grid, patch_hw) == (len(names), GRID, (4, 4))
  assert family.prefix_names(arch) == names
  assert family.reads_class_token(arch) is reads_class
  x = _images()
  logits, attn = jax.jit(family.attention_fn(arch))(params, x)
  attn = np.asarray(attn)
  n = prefix + 16
  assert logits.shape == (6, 3) and attn.shape == (2, 6, 2, n, n)
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert attn.min() >= 0
  rolled = A.rollout(attn)
  np.testing.assert_allclose(rolled.sum(-1), 1.0, atol=1e-9)
  maps = A.output_token_map(rolled, prefix, grid, reads_class)
  assert maps.shape == (6, 4, 4)                      # over the patches only
  np.testing.assert_allclose(maps.sum((-1, -2)), 1.0, atol=1e-9)
  to_prefix, to_patches = A.token_shares(attn, prefix, reads_class)
  assert to_prefix.shape == (2, prefix) and to_patches.shape == (2,)
  np.testing.assert_allclose(to_prefix.sum(-1) + to_patches, 1.0, atol=1e-6)
  # Random init attends nearly uniformly: each token gets about 1/n, the patches about 16/n.
  np.testing.assert_allclose(to_patches, 16 / n, atol=0.15)
  dist = A.attention_distance(attn, prefix, grid, patch_hw)
  assert dist.shape == (2, 6, 2) and np.all(dist > 0) and np.all(dist < np.hypot(12, 12))
  flat = params_lib.flatten_numpy(family.to_file_layout(params))
  if table_kind is None:
    with pytest.raises(NotImplementedError, match=f'not defined for this {family.name} model'):
      family.position_table(flat, arch)
  else:
    kind, table = family.position_table(flat, arch)
    assert kind == table_kind and table.shape == (4, 4, 32)
  assert family.patch_filters(flat, arch).shape == (4, 4, 3, 32)
  # The sink measurement: every block's tokens, prefix apart, through the backbone API.
  out = jax.jit(lambda p, im: arch.create_model().apply({'params': p}, im, intermediates=(0, 1)))(
      params, x)
  assert [m.shape for m in out['maps']] == [(6, 4, 4, 32)] * 2
  assert out['prefix'][-1].shape == (6, prefix, 32)
  tokens = np.concatenate([out['prefix'][-1], np.asarray(out['maps'][-1]).reshape(6, 16, 32)], 1)
  registers = sum(t.startswith('register') for t in names)
  part = sinks.measure_batch(attn[-1], tokens, out['maps'], prefix, registers, reads_class)
  assert part['outlier_fraction'].shape == (6,) and part['layer_max_over_median'].shape == (6, 2)
  assert part['attn_registers_each'].shape == (6, registers)
  total = part['attn_class'] + part['attn_registers'] + part['attn_outlier_patches'] + part[
      'attn_other_patches']
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  _fewshot(arch, params)


def _fewshot(arch, params):
  """Pre-logits of the headless model for generated images of 3 classes (a bright band in one of
  three rows, plus noise): [N, 32] finite features that a 2-shot ridge separates."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 6)
  images = rng.integers(0, 60, (18, SIZE, SIZE, 3)).astype(np.uint8)
  for i, y in enumerate(labels):
    images[i, 5 * y:5 * y + 5] = 230
  src = ArraySource(images, labels, class_names=['top', 'middle', 'bottom'])
  mesh = sharding_lib.make_mesh((('data', -1),))
  rep = jax.tree.map(lambda _: sharding_lib.replicated(mesh), params)
  fn = fewshot.make_features_fn(arch.create_model(), mesh, rep,
                                head_prefixes=arch.get_family().head_prefixes,
                                input_fn=fewshot.input_fn_for(arch))
  feats, got = fewshot.extract_features(fn, params, src, image_size=(SIZE, SIZE), channels=3,
                                        batch_size=6)
  assert feats.shape == (18, 32) and np.all(np.isfinite(feats))
  np.testing.assert_array_equal(got, labels)
  train = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(3)])
  test = np.setdiff1d(np.arange(18), train)
  acc = fewshot.accuracy('ridge', feats[train], labels[train], feats[test], labels[test], 3)
  assert acc == 1.0, acc


@pytest.mark.parametrize('name', ['DINOv2-S_14-reg4', 'ViT-B_16-rope-reg1-gap', 'BEiTv2-B_16'])
def test_inspect_checkpoint_reports_prefix_tokens_apart(name, tmp_path):
  """The whole inspection with --sinks on a registers ViT, a RoPE model whose only prefix token is
  a register, and BEiT (relative positions: no table): token_shares.json names each prefix token,
  sinks.json has its numbers, the index shows the new figures."""
  arch = tiny(name)
  names = VARIANTS[name][0]
  predictor = Predictor(arch, _init(arch), ['a', 'b', 'c'])
  pixels = np.random.default_rng(2).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
  imgs = inspection.prepare(list(pixels), [f'img{i}.png' for i in range(5)], arch)
  report = inspection.inspect_checkpoint(predictor, str(tmp_path), dataset_imgs=imgs,
                                         rollout_count=1, batch_size=4, sinks=True)
  shares = json.loads((tmp_path / 'token_shares.json').read_text())
  assert shares['tokens'] == names + ['patches']
  table = np.array(shares['share_per_layer'])
  assert table.shape == (2, len(names) + 1)
  np.testing.assert_allclose(table.sum(-1), 1.0, atol=1e-4)
  sink = json.loads((tmp_path / 'sinks.json').read_text())
  assert sink['num_images'] == 5 and sink['prefix_tokens'] == names
  assert len(sink['max_over_median_per_layer']) == 2 and sink['max_over_median_mean'] >= 1
  registers = sum(t.startswith('register') for t in names)
  assert len(sink['reader_attention']['registers_each']) == registers
  assert 0 <= sink['outlier_fraction_mean'] <= 1
  assert sink['after_final_norm']['max_over_median_mean'] >= 1
  pngs = [f for _, f, _ in report.figures]
  assert 'token_shares.png' in pngs and 'sinks.png' in pngs and pngs[0].startswith('rollout_00')
  assert (table[:, -1] > 0.5).all()                   # random init: mostly patches
