"""The ViT family's later variants (LayerScale, registers, no_embed_class, fc_norm, MAP/GAP heads)
and its backbone API (`dynamic_img_size`, `intermediates=`), without timm (the comparisons with timm
are in tests/test_vit_variants_timm.py): the call-time image size equals building the model at that
size from the checkpoint resampled by `families/resample.py`, compiled once per shape; intermediate
layers agree with the model's own outputs, scanned or not; registers are prefix tokens for every
objective; every new parameter has a tensor rule; summary prints timm's count."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from vit_jax import summary
from vit_jax.families import registry, resample
from vit_jax.families.vit import POSEMB_KEY
from vit_jax.models import params as params_lib
from vit_jax.models.tokens import TokenInputs

BASE = dict(registry.get_model_config('ViT-testing'), head_zeroinit=False)
# One tiny model per feature combination of the registered variants (patch 4, width 32, 2 blocks).
VARIANTS = {
    'deit3': dict(act='gelu', layer_scale=0.5, no_embed_class=True),
    'dinov2': dict(act='gelu', layer_scale=0.5),
    'dinov2-reg': dict(act='gelu', layer_scale=0.5, num_registers=3, no_embed_class=True),
    'siglip': dict(classifier='map'),
    'siglip-gap': dict(classifier='gap'),
    'little': dict(act='gelu', layer_scale=0.5, num_registers=2, no_embed_class=True, fc_norm=True,
                   classifier='gap'),
}
FAMILY = registry.get_family('vit')


def build(family_name='vit', size=16, classes=5, seed=0, **fields):
  family = registry.get_family(family_name)
  base = dict(registry.get_model_config(family.test_model), head_zeroinit=False)
  model = family.create({**base, **fields}, classes)
  x = jnp.zeros((1, size, size, 3))
  params = model.init(jax.random.PRNGKey(seed), x)['params']
  # Every parameter O(1) (LayerScale, registers, zero-initialised ones too): a wrong path shows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                     for k, l in zip(keys, leaves)])
  return family, model, params


def images(h, w, batch=2, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, h, w, 3), minval=-1, maxval=1)


# ---------- call-time image size ----------

@pytest.mark.parametrize('family_name,fields,method', [
    ('vit', VARIANTS['dinov2'], 'bilinear'), ('vit', VARIANTS['dinov2-reg'], 'bicubic'),
    ('vit', VARIANTS['siglip-gap'], 'bilinear'), ('deit', {}, 'bicubic'),
    ('hybrid', {}, 'bilinear')])
def test_dynamic_img_size_equals_the_model_built_at_that_size(family_name, fields, method):
  """Built at 16x16 (a 4x4 table), called at 12x24 (3x6) and 28x20 (7x5): the same logits as the
  model built at that size from the checkpoint whose table `resample.resample_posemb` resampled with
  the same method (float32 rounding of a different summation order only)."""
  dyn_fields = dict(fields, dynamic_img_size=True, dynamic_resize=method)
  family, model, params = build(family_name, 16 if family_name != 'hybrid' else 32, **dyn_fields)
  patch = family.patch_hw({**registry.get_model_config(family.test_model), **fields})
  flat = params_lib.flatten_numpy(params)
  table_prefix = family.table_prefix({**registry.get_model_config(family.test_model), **fields})
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
  for h, w in ((3, 6), (7, 5)):
    x = images(h * patch[0], w * patch[1])
    got = apply(params, x)
    fixed = family.create({**dict(registry.get_model_config(family.test_model)),
                           'head_zeroinit': False, **fields}, 5)
    resampled = dict(flat)
    resampled[POSEMB_KEY] = resample.resample_posemb(flat[POSEMB_KEY], (h, w),
                                                     num_prefix=table_prefix, method=method)
    want = fixed.apply({'params': params_lib.unflatten(resampled)}, x)
    assert_close_to_scale(got, want, rtol=1e-5, what=f'{family_name} {h}x{w}')
    assert float(jnp.max(jnp.abs(want))) > 0.1
  # One compilation per input shape, reused: 16x16 then the two sizes again.
  apply(params, images(4 * patch[0], 4 * patch[1]))
  apply(params, images(3 * patch[0], 6 * patch[1]))
  assert apply._cache_size() == 3


def test_another_grid_without_dynamic_img_size_is_a_clear_error():
  _, model, params = build(**VARIANTS['dinov2-reg'])
  with pytest.raises(ValueError, match='dynamic_img_size=True'):
    model.apply({'params': params}, images(12, 16))


def test_posemb_grid_keeps_a_table_of_its_own_size():
  """DINOv2's 518 px table (37x37) used at another size: `posemb_grid` fixes the table's shape, so
  the model is built, counted and checkpointed with it whatever the image size."""
  _, model, params = build(posemb_grid=(5, 5), dynamic_img_size=True, **VARIANTS['dinov2-reg'])
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 25, 32)
  assert model.apply({'params': params}, images(16, 16)).shape == (2, 5)
  assert model.apply({'params': params}, images(20, 20)).shape == (2, 5)


# ---------- intermediate layers ----------

@pytest.mark.parametrize('family_name,fields', [
    ('vit', VARIANTS['dinov2-reg']), ('vit', VARIANTS['little']), ('deit', {}), ('hybrid', {})])
def test_intermediates_agree_with_the_models_own_outputs(family_name, fields):
  """The last block with norm=True is the token map of `return_aux` (final norm, prefix apart); a
  scanned model gives the same maps; negative indices count from the end; drop_prefix drops them."""
  size = 16 if family_name != 'hybrid' else 32
  family, model, params = build(family_name, size, **fields)
  x = images(size, size)
  _, aux = model.apply({'params': params}, x, return_aux=True)
  out = model.apply({'params': params}, x, intermediates=(0, -1), norm=True)
  b, n, d = aux['patch_tokens'].shape
  g = int(np.sqrt(n))
  assert [m.shape for m in out['maps']] == [(b, g, g, d)] * 2
  np.testing.assert_allclose(out['maps'][1].reshape(b, n, d), aux['patch_tokens'], atol=1e-5)
  np.testing.assert_allclose(out['prefix'][1], aux['prefix_tokens'], atol=1e-5)
  assert out['prefix'][0].shape == aux['prefix_tokens'].shape
  if fields.get('fc_norm'):  # the norm follows the pooling: norm=True changes nothing
    raw = model.apply({'params': params}, x, intermediates=(1,), norm=False)
    np.testing.assert_array_equal(raw['maps'][0], out['maps'][1])
  dropped = model.apply({'params': params}, x, intermediates=(-2,), drop_prefix=True)
  assert set(dropped) == {'maps'}
  if family_name == 'vit':
    scan = family.create({**BASE, **fields, 'scan': True}, 5)
    stacked = family.to_module_layout(params, {'scan': True})
    out_scan = scan.apply({'params': stacked}, x, intermediates=(0, -1), norm=True)
    for a, c in zip(out_scan['maps'] + out_scan['prefix'], out['maps'] + out['prefix']):
      assert_close_to_scale(a, c, rtol=1e-5, what='scan')
  with pytest.raises(ValueError, match='out of range: the model has 2 blocks'):
    model.apply({'params': params}, x, intermediates=(2,))


# ---------- registers in the objective contract ----------

def test_registers_are_prefix_tokens_that_no_pooling_reads():
  for name in ('dinov2-reg', 'little'):
    fields = VARIANTS[name]
    _, model, params = build(**fields)
    x = images(16, 16)
    prefix = int(fields['classifier'] == 'token' if 'classifier' in fields else 1)
    prefix += fields['num_registers']
    logits, aux = model.apply({'params': params}, x, return_aux=True)
    assert aux['prefix_tokens'].shape == (2, prefix, 32)
    assert aux['attention_weights'].shape[-1] == prefix + 16
    # keep (MAE), shallow and deep prompts (VPT), mask (MPP): prefix tokens always kept.
    keep = jnp.array([[0, 5, 9], [1, 2, 15]], jnp.int32)
    deep = jnp.ones((2, 3, 32)) * 0.1
    mask = jnp.zeros((2, 16), bool).at[:, 3].set(True)
    _, aux_k = model.apply({'params': params}, x, return_aux=True,
                           tokens=TokenInputs(keep=keep, prompts=deep, mask=mask,
                                              mask_embedding=jnp.ones(32)))
    assert aux_k['prefix_tokens'].shape == (2, prefix, 32)
    assert aux_k['patch_tokens'].shape == (2, 3, 32)
    assert aux_k['attention_weights'].shape[-1] == prefix + 3 + 3
    if fields.get('classifier') == 'gap':  # the mean of the patch tokens only, then fc_norm
      mean = aux['patch_tokens'].mean(axis=1)
      fc = params['fc_norm']
      mu, var = mean.mean(-1, keepdims=True), mean.var(-1, keepdims=True)
      want = (mean - mu) / jnp.sqrt(var + 1e-6) * fc['scale'] + fc['bias']
      np.testing.assert_allclose(aux['pre_logits'], want, atol=1e-5)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('objective', ['mae', 'prompt'])
def test_objectives_train_a_register_model(objective):
  """MAE (keep) and deep prompts on DINOv2-with-registers' combination (class token, registers,
  LayerScale, no_embed_class): two steps through the trainer's assembly, finite loss."""
  from tests.test_objectives import _build, config_for  # pylint: disable=import-outside-toplevel
  from vit_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  overrides = {f'model.{k}': v for k, v in VARIANTS['dinov2-reg'].items()}
  c = config_for('vit', objective, **overrides)
  built = _build(c, {})
  state, _ = state_lib.create_train_state(
      built.model, built.tx, built.input_shape, 0, built.mesh, objective=built.objective,
      tensor_rules=built.family.tensor_rules)
  if built.objective.freezes():
    tree = built.model.init(jax.random.PRNGKey(5), jnp.zeros(built.input_shape))['params']
    assert tree['registers'].shape == (1, 3, 32)
    built = built.with_frozen(built.objective.frozen_params(tree))
  batch = {k: jax.random.uniform(jax.random.PRNGKey(i), v.shape, v.dtype, -1, 1)
           for i, (k, v) in enumerate(built.abstract_batch().items())}
  if 'labels' in batch:
    batch['labels'] = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  losses = []
  for _ in range(2):
    state, metrics = built.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))


# ---------- declarations ----------

@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_every_new_parameter_has_a_tensor_rule(name):
  """As tests/test_families.py for the registered test models: no matrix parameter of any variant
  falls through the rules (registers [1, R, D] are replicated deliberately)."""
  model = FAMILY.create({**BASE, **VARIANTS[name]}, 5)
  shapes = summary.param_shapes(model, (16, 16))
  for path, leaf in params_lib.flatten(shapes).items():
    if sum(d > 1 for d in leaf.shape) >= 2:
      assert any(re.search(p, path) for p, _ in FAMILY.tensor_rules), path
  if VARIANTS[name].get('num_registers'):
    assert any(re.search(p, 'registers') and r == () for p, r in FAMILY.tensor_rules)


def test_summary_prints_timms_count_for_dinov2_at_518(capsys):
  assert summary.main(['--model', 'DINOv2-S_14-reg4', '--num_classes', '1000',
                       '--image_size', '518']) in (0, None)
  out = capsys.readouterr().out
  assert out.rstrip().endswith('params: 22442344')
  assert '4 registers' in out and 'position embedding on the patches only' in out


def test_exports_that_cannot_express_a_variant_refuse_it():
  """Google's npz layout has no LayerScale or registers, and transformers has no ViT with registers
  but no class token (ViT-Little): refused, naming the way that works (`--to timm`), never written
  without them. (DINOv2 with registers is written as transformers' Dinov2WithRegisters:
  tests/test_hf_variants.py.)"""
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  fields = {**VARIANTS['little'], 'fc_norm': False}
  _, _, params = build(**fields)
  flat = params_lib.flatten_numpy(params)
  arch = Architecture({**BASE, **fields}, 5, (16, 16), 3, 'vit')
  with pytest.raises(ValueError, match='--to timm'):
    registry.interop('vit').to_hf(flat, arch)
  bad = registry.interop('vit').npz_keys_ok(flat)
  assert 'registers' in bad and any('/LayerScale_1/' in k for k in bad)
