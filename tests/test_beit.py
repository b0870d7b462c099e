"""The BEiT family against timm 1.0's `Beit` and transformers 5's `BeitForImageClassification`:
tiny models of the registered architectures built by timm's factory, perturbed and saved as timm
saves them, read here through `predict`, written back (`convert --to timm`, `--to hf`), moved to
other image sizes (call time and checkpoint transfer), and asked for intermediate layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import interop
from tests.numerics import assert_close_to_scale, assert_logits_match
from tests.test_eva import TINY, normalised, predict_logits, run_timm, timm_model

torch, timm = interop.require_timm()

from timm.models import save_for_hf  # noqa: E402

from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.checkpoints.pretrained import adapt_params  # noqa: E402
from vit_jax.convert import convert  # noqa: E402
from vit_jax.families import registry  # noqa: E402
from vit_jax.families import resample  # noqa: E402
from vit_jax.families.base import Architecture  # noqa: E402
from vit_jax.models import params as params_lib  # noqa: E402
from vit_jax.models import relpos  # noqa: E402
from vit_jax.models import tokens as tokens_lib  # noqa: E402

# (timm architecture, overrides, image size): BEiT v2 as registered, and BEiT v1's layout with an
# absolute table, class-token pooling and a non-square grid.
CASES = {
    'beitv2': ('beitv2_base_patch16_224', dict(img_size=32, patch_size=8), (32, 32)),
    'beit_token_abs': ('beit_base_patch16_224', dict(img_size=(24, 40), patch_size=8,
                                                     global_pool='token', use_abs_pos_emb=True),
                       (24, 40)),
}


def _read(tmp_path, model):
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  return read_checkpoint(tmp_path / 'timm')


@pytest.mark.parametrize('case', sorted(CASES))
def test_timm_directory_in_and_out_with_timms_logits(case, tmp_path):
  name, overrides, size = CASES[case]
  model = timm_model(name, overrides)
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
  ours = predict_logits(tmp_path / 'timm', image, tmp_path)  # ImageNet / 0.5 normalisation
  diff = assert_logits_match(ours, run_timm(model, normalised(image, model)))
  assert read_checkpoint(tmp_path / 'timm').architecture.family == 'beit'
  convert(tmp_path / 'timm', 'timm', tmp_path / 'back', log=None)
  again = timm.create_model(f'local-dir:{tmp_path / "back"}', pretrained=True).eval()
  back = assert_logits_match(ours, run_timm(again, normalised(image, again)), what='convert')
  print(f'{case}: max |logit diff| timm -> predict {diff:.3g}, convert --to timm {back:.3g}')


def test_relative_index_and_table_resize_are_timms():
  from timm.layers import resize_rel_pos_bias_table
  from timm.models.beit import gen_relative_position_index
  for grid in ((3, 5), (4, 4)):
    np.testing.assert_array_equal(relpos.relative_index(grid),
                                  gen_relative_position_index(grid).numpy())
  table = np.random.default_rng(0).normal(size=(relpos.table_rows((3, 5)), 2)).astype(np.float32)
  theirs = resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=(4, 7),
                                     new_bias_shape=(relpos.table_rows((4, 7)), 2),
                                     old_window_size=(3, 5)).numpy()
  from vit_jax.families.beit import resize_table
  np.testing.assert_allclose(resize_table(table, (3, 5), (4, 7)), theirs, atol=1e-6)
  # ... and the call-time resize (jnp, inside jit) is the checkpoint transfer's.
  at_call = jax.jit(lambda t: relpos.resize_table(t, (3, 5), (4, 7)))(table)
  np.testing.assert_allclose(at_call, theirs, atol=1e-6)
  offsets = resample.resize_relative_position_bias(table[:-3], (3, 5), (4, 7), 'timm')
  np.testing.assert_allclose(offsets, theirs[:-3], atol=1e-6)


def test_call_time_image_size_equals_timm_and_a_model_built_at_that_size(tmp_path):
  """timm's Beit has no `dynamic_img_size`; its `set_input_size` (the same table resize as its
  checkpoint filter) is the reference. Ours runs at 48x56 inside jit, and equals a model built there
  from the checkpoint moved by `adapt_params` (tables named in the report)."""
  name, overrides, _ = CASES['beitv2']
  model = timm_model(name, overrides)
  ckpt = _read(tmp_path, model)
  params = params_lib.unflatten(ckpt.params)
  dyn = ckpt.architecture.create_model(dynamic_img_size=True)
  x = np.random.default_rng(2).normal(size=(2, 48, 56, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda p, x: dyn.apply({'params': p}, x))(params, x))
  model.set_input_size((48, 56))
  assert_logits_match(ours, run_timm(model, x), what='timm set_input_size')
  fixed = ckpt.architecture.create_model()
  init = jax.eval_shape(fixed.init, jax.random.PRNGKey(0), x)['params']
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  moved, report = adapt_params(ckpt, zeros, model=fixed, image_size=(48, 56))
  tables = [r for r in report.reshaped if r[0].endswith('relative_position_bias_table')]
  assert len(tables) == TINY['depth'] and tables[0][1:] == ((52, 2), (11 * 13 + 3, 2))  # 4x4 -> 6x7
  assert any('(timm)' in n for n in report.notes), report.lines()
  np.testing.assert_allclose(np.asarray(fixed.apply({'params': moved}, x)), ours, atol=1e-5)


def test_intermediate_layers_equal_timms(tmp_path):
  name, overrides, size = CASES['beit_token_abs']
  model = timm_model(name, overrides)
  ckpt = _read(tmp_path, model)
  x = np.random.default_rng(3).normal(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                         indices=[0, 1], norm=True, return_prefix_tokens=True,
                                         intermediates_only=True)
  ours = ckpt.architecture.create_model().apply({'params': params_lib.unflatten(ckpt.params)}, x,
                                                intermediates=(-2, 1), norm=True)
  for (fmap, prefix), m, p in zip(theirs, ours['maps'], ours['prefix']):
    assert m.shape == (2, 3, 5, TINY['embed_dim'])
    assert_close_to_scale(m, fmap.numpy().transpose(0, 2, 3, 1), what='map')
    assert_close_to_scale(p, prefix.numpy(), what='prefix')


def test_token_inputs_contract():
  """KEEP: the relative bias follows each kept patch (all patches shuffled: the full run's tokens
  in that order, the same logits); PROMPTS: position-free tokens after the class token."""
  family = registry.get_family('beit')
  fields = dict(registry.get_model_config(family.test_model), head_zeroinit=False)
  model = family.create(fields, 5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(2)  # tables away from zero
  params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.1, p.shape).astype(np.float32),
                        params)
  logits, aux = model.apply(params, x, return_aux=True)
  perm = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), 16) for i in (5, 6)])
  kept_logits, kept = model.apply(params, x, return_aux=True,
                                  tokens=tokens_lib.TokenInputs(keep=perm))
  want = jnp.take_along_axis(aux['patch_tokens'], perm[..., None], axis=1)
  np.testing.assert_allclose(kept['patch_tokens'], want, atol=2e-5)
  np.testing.assert_allclose(kept_logits, logits, atol=2e-5)
  out, paux = model.apply(params, x, return_aux=True, tokens=tokens_lib.TokenInputs(
      prompts=jnp.ones((fields['num_layers'], 3, fields['hidden_size']))))
  assert paux['patch_tokens'].shape == aux['patch_tokens'].shape
  assert paux['attention_weights'].shape[-1] == 1 + 3 + 16
  assert float(jnp.max(jnp.abs(out - logits))) > 1e-4


def test_hugging_face_export_and_import_match_transformers(tmp_path):
  """BEiT v2's layout is Hugging Face's `BeitForImageClassification` (relative tables per layer,
  lambda LayerScale, mean pooling): exported, transformers computes our logits; a transformers
  model saved with `save_pretrained` reads back with its own."""
  transformers = interop.require('transformers')
  from vit_jax.formats import hf as hf_format
  family = registry.get_family('beit')
  fields = dict(registry.get_model_config('BEiT-testing'), head_zeroinit=False)
  model = family.create(fields, 3)
  x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.1, p.shape).astype(np.float32),
                        params)
  flat = params_lib.flatten_numpy(params)
  arch = Architecture(fields, 3, (16, 16), 3, 'beit')
  hf_format.write_hf(tmp_path / 'hf', flat, arch)
  theirs = transformers.BeitForImageClassification.from_pretrained(str(tmp_path / 'hf')).eval()
  ours = np.asarray(model.apply({'params': params}, x))
  with torch.no_grad():
    got = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()
  diff = assert_logits_match(ours, got, what='HF export')
  theirs.save_pretrained(str(tmp_path / 'again'))
  back = read_checkpoint(tmp_path / 'again')
  assert back.format == 'hf' and back.architecture.family == 'beit'
  again = back.architecture.create_model().apply({'params': params_lib.unflatten(back.params)}, x)
  assert_logits_match(np.asarray(again), got, what='HF import')
  print(f'BEiT: max |logit diff| against transformers {diff:.3g}')
  with pytest.raises(ValueError, match='height != width.*--to timm'):
    registry.interop('beit').to_hf(flat, Architecture(fields, 3, (16, 24), 3, 'beit'))
