"""MAE (vit_jax/objectives/mae.py): per-image random masking fixed by the key, an encoder that runs
on the visible patches only (its compiled FLOPs about a quarter of the full encoder's), a decoder of
its own width, depth and position embedding, the per-patch normalised pixel loss against a NumPy
reference, and an encoder that exports to timm and fine-tunes like any ViT."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_mpp import TINY, _main, assert_objective_figure
from vit_jax.families import registry
from vit_jax.models import params as params_lib
from vit_jax.models.tokens import TokenInputs
from vit_jax.objectives import mae, registry as objectives
from vit_jax.train import build as build_lib


def test_masking_is_a_uniform_subset_per_image_fixed_by_the_key():
  keep = np.asarray(mae.random_keep(jax.random.PRNGKey(0), 400, 16, 0.75))
  assert keep.shape == (400, 4)
  assert (np.diff(keep, axis=1) > 0).all()  # sorted, distinct
  assert len({tuple(k) for k in keep}) > 300  # images differ
  counts = np.bincount(keep.ravel(), minlength=16) / keep.size
  assert np.abs(counts - 1 / 16).max() < 0.02  # every patch equally likely
  again = np.asarray(mae.random_keep(jax.random.PRNGKey(0), 400, 16, 0.75))
  assert np.array_equal(keep, again)
  hidden = np.asarray(mae.hidden_mask(jnp.asarray(keep), 16))
  assert (hidden.sum(axis=1) == 12).all() and (hidden[np.arange(400)[:, None], keep] == 0).all()


def _vit(**overrides):
  fields = dict(registry.get_model_config('ViT-testing'))
  fields.update(patch_size=4, posemb='sincos2d', **overrides)
  return registry.create_model(fields, None)


def test_the_encoder_sees_the_kept_patches_after_their_position_embedding():
  """Kept in another order, the visible tokens are the full encoder's tokens in that order: the
  position embedding is added before the patches are chosen (attention does not care about the
  order)."""
  model = _vit()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(2), x)['params']
  _, full = model.apply({'params': params}, x, return_aux=True, return_weights=False)
  order = jnp.asarray(np.stack([np.random.default_rng(i).permutation(16) for i in range(2)]))
  _, kept = model.apply({'params': params}, x, tokens=TokenInputs(keep=order), return_aux=True,
                        return_weights=False)
  want = np.take_along_axis(np.asarray(full['patch_tokens']), np.asarray(order)[..., None], 1)
  np.testing.assert_allclose(np.asarray(kept['patch_tokens']), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(kept['prefix_tokens']),
                             np.asarray(full['prefix_tokens']), atol=2e-5)


def test_the_encoder_on_a_quarter_of_the_patches_costs_about_a_quarter_of_the_flops():
  model = registry.create_model(registry.get_model_config('ViT-B_16'), None)
  x = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  keep = jax.ShapeDtypeStruct((8, 49), jnp.int32)

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  full = flops(lambda p, x: model.apply(p, x), params, x)
  visible = flops(lambda p, x, k: model.apply(p, x, tokens=TokenInputs(keep=k)), params, x, keep)
  ratio = visible / full
  print(f'MAE encoder FLOPs at 75% masking: {ratio:.3f} of the full encoder ({visible:.3g} of '
        f'{full:.3g})')
  # 50 of 197 tokens: 0.254 of the token-linear work; attention's quadratic part shrinks more, the
  # patch embedding (all 196 patches) not at all.
  assert 0.22 < ratio < 0.30, ratio


def _objective(**block):
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config('model=ViT-testing')
  c.model.patch_size = 4
  c.image_size, c.channels = 16, 3
  c.objective.name = 'mae'
  for k, v in {'decoder_width': 24, 'decoder_depth': 2, 'decoder_heads': 3,
               'decoder_mlp_dim': 40, **block}.items():
    c.mae[k] = v
  family, fields = registry.resolve(c.model)
  return c, objectives.create(c, family, fields, None)


def test_the_decoder_has_its_own_width_depth_and_fixed_position_embedding():
  c, objective = _objective()
  built = build_lib.build_training(c, 10, abstract=True)
  own = params_lib.flatten(built.abstract_state.params['objective']['decoder'])
  assert own['embed/kernel'].shape == (32, 24)            # encoder width 32 -> decoder width 24
  assert own['mask_token'].shape == (24,)
  assert {k.split('/')[0] for k in own if k.startswith('encoderblock_')} == {
      'encoderblock_0', 'encoderblock_1'}
  assert own['encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape == (24, 40)
  assert own['pred/kernel'].shape == (24, 4 * 4 * 3)     # every pixel of a 4x4 RGB patch
  assert not any('pos' in k for k in own)                 # sin-cos, computed, not learned
  assert objective.head_classes() is None and 'head/kernel' not in params_lib.flatten(
      built.abstract_state.params)


@pytest.mark.parametrize('norm_pix', [True, False])
def test_the_loss_is_the_mean_squared_error_on_hidden_patches(norm_pix):
  c, objective = _objective(norm_pix_loss=norm_pix)
  model = registry.create_model(dict(registry.resolve(c.model)[1]), None)
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3), minval=-1, maxval=1)
  params = jax.jit(lambda: jax.tree.map(lambda a: a, objective.initial_params(
      model.init(jax.random.PRNGKey(1), x[:1])['params'], model, jax.random.PRNGKey(2),
      (1, 16, 16, 3))))()
  rng = jax.random.PRNGKey(4)
  loss, _ = objective.loss(model, params, {}, {'image': x}, rng)
  k_mask, _ = jax.random.split(rng)
  out = objective.reconstruct(model, params, {}, x, k_mask, train=True,
                              dropout_rng=jax.random.split(rng)[1])
  pred, hidden = np.asarray(out['pred'], np.float64), np.asarray(out['hidden'])
  patches = np.asarray(x, np.float64).reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(3, 16, 48)
  if norm_pix:
    patches = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
        patches.var(-1, keepdims=True) + 1e-6)
  per_patch = ((pred - patches) ** 2).mean(-1)
  want = (per_patch * hidden).sum() / hidden.sum()
  assert hidden.sum() == 3 * 12
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_mae_trains_exports_its_encoder_and_fine_tunes(tmp_path):
  args = [*TINY, '--config.objective.name=mae', '--config.model.posemb=sincos2d',
          '--config.mae.decoder_width=16', '--config.mae.decoder_depth=1',
          '--config.mae.decoder_heads=2', '--config.mae.decoder_mlp_dim=32',
          '--config.mae.mask_ratio=0.5']
  result, _ = _main(tmp_path / 'mae', *args)
  assert result['step'] == 6 and np.isfinite(result['eval_loss']) and 'eval_top1' not in result
  assert_objective_figure(tmp_path / 'mae', tmp_path / 'inspect', 'mae')
  from vit_jax.convert.api import convert  # pylint: disable=import-outside-toplevel
  written = convert(str(tmp_path / 'mae'), 'timm', str(tmp_path / 'timm'), log=None)
  assert written.architecture.num_classes is None and any('decoder' in n for n in written.notes)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  keys = set(load_file(str(tmp_path / 'timm' / 'model.safetensors')))
  assert 'blocks.0.attn.qkv.weight' in keys and not any('decoder' in k for k in keys)
  result, log = _main(tmp_path / 'ft', *TINY, f'--config.pretrained={tmp_path / "mae"}',
                      '--config.model.posemb=sincos2d', '--config.optimizer=sgd',
                      '--config.weight_decay=0.0')
  assert 'eval_top1' in result and 'dropped  objective/decoder/embed/kernel' in log
