"""load_pretrained: adapting a checkpoint to a new model, with every difference reported."""
from __future__ import annotations


import jax
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from vit_jax.families import registry
from tests.test_npz import CLASSES, D, images_of, make_params, np_vit
from vit_jax.checkpoints import load_pretrained, read_checkpoint
from vit_jax.families import resample as posemb
from vit_jax.checkpoints.npz import write_npz
from vit_jax.families.registry import create_model
from vit_jax.families import vit as vit_family
from vit_jax.models import params as params_lib

PE = 'Transformer/posembed_input/pos_embedding'


def _target(num_classes=CLASSES, size=(16, 16), channels=3, **overrides):
  """A ViT-testing model and stand-in initial params: noise in the init's shapes and dtypes
  (jax.eval_shape compiles nothing, which keeps these tests fast)."""
  model = create_model(registry.get_model_config('ViT-testing'), num_classes, **overrides)
  x = np.zeros((1, *size, channels), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.RandomState(7)
  return model, jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)


def _npz(tmp_path, name='ckpt.npz', **kwargs):
  path = tmp_path / name
  write_npz(path, make_params('vit_jax', **kwargs))
  return str(path)


def _logits(model, params, x):
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x))


def test_same_architecture_loads_everything(tmp_path):
  src = make_params('vit_jax')
  path = tmp_path / 'a.npz'
  write_npz(path, src)
  model, init = _target()
  lines = []
  params, report = load_pretrained(path, init, model=model, log=lines.append)
  assert not (report.added or report.dropped or report.reshaped)
  assert len(report.loaded) == len(src) and lines[0].startswith('loaded 40 arrays')
  assert jax.tree.structure(params) == jax.tree.structure(init)
  x = images_of()
  # float32 at 'highest' precision against float64 NumPy: 1e-5 of the logits' scale (test_npz).
  assert_close_to_scale(_logits(model, params, x), np_vit(src, x), rtol=1e-5)


def test_new_class_count_gets_a_zero_head(tmp_path):
  model, init = _target(num_classes=7)
  params, report = load_pretrained(_npz(tmp_path), init, model=model, log=None)
  assert sorted(report.added) == ['head/bias', 'head/kernel']
  np.testing.assert_array_equal(params['head']['kernel'], 0)
  np.testing.assert_array_equal(params['head']['bias'], init['head']['bias'])  # The target's init.
  params, _ = load_pretrained(_npz(tmp_path), init, model=model, new_head='init', log=None)
  np.testing.assert_array_equal(params['head']['kernel'], init['head']['kernel'])
  assert any('(32, 5) in the checkpoint, (32, 7) in the model' in n for n in report.notes)


def test_higher_resolution_resamples_the_grid(tmp_path):
  src = make_params('vit_jax')  # 16x16 pixels at patch 4: a 4x4 grid.
  path = tmp_path / 'a.npz'
  write_npz(path, src)
  model, init = _target(size=(24, 40))
  params, report = load_pretrained(path, init, model=model, image_size=(24, 40), log=None)
  assert report.reshaped == [(PE, (1, 17, D), (1, 61, D))]
  want = posemb.resample_posemb(src[PE], (6, 10), num_prefix=1)
  np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'], want)
  np.testing.assert_array_equal(want[:, 0], src[PE][:, 0])
  # Without the image size a non-square target grid cannot be guessed: a clear error.
  with pytest.raises(ValueError, match='not a square'):
    load_pretrained(path, init, model=model, log=None)


def test_pre_logits_kept_or_dropped_by_config(tmp_path):
  path = _npz(tmp_path, representation=16)
  model, init = _target()
  params, report = load_pretrained(path, init, model=model, log=None)
  assert report.dropped == ['pre_logits/bias', 'pre_logits/kernel']
  assert 'pre_logits' not in params
  with pytest.raises(ValueError, match='keep_pre_logits=True, but the target model has no pre-logits'):
    load_pretrained(path, init, model=model, keep_pre_logits=True, log=None)
  model, init = _target(representation_size=16)
  params, report = load_pretrained(path, init, model=model, log=None)
  assert 'pre_logits/kernel' in report.loaded
  params, report = load_pretrained(path, init, model=model, keep_pre_logits=False, log=None)
  assert 'pre_logits/kernel' in report.added
  np.testing.assert_array_equal(params['pre_logits']['kernel'], init['pre_logits']['kernel'])


def test_classifier_change_drops_or_adds_the_class_token(tmp_path):
  model, init = _target(classifier='gap')
  params, report = load_pretrained(_npz(tmp_path), init, model=model, log=None)
  assert 'cls' in report.dropped
  src = make_params('vit_jax')
  np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'],
                                src[PE][:, 1:])
  model, init = _target(classifier='token')
  params, report = load_pretrained(_npz(tmp_path, 'g.npz', classifier='gap'), init, model=model,
                                   log=None)
  assert 'cls' in report.added
  np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'][:, 1:],
                                make_params('vit_jax', classifier='gap')[PE])
  model, init = _target(classifier='map')
  params, report = load_pretrained(_npz(tmp_path), init, model=model, log=None)
  assert any(p.startswith('MAPHead_0/') for p in report.added)


def test_sincos_target_ignores_learned_posemb_with_a_warning(tmp_path, caplog):
  model, init = _target(posemb='sincos2d')
  with caplog.at_level('WARNING'):
    _, report = load_pretrained(_npz(tmp_path), init, model=model, log=None)
  assert PE in report.dropped
  assert 'recomputed' in caplog.text


def test_scanned_target_and_bfloat16(tmp_path):
  import jax.numpy as jnp
  model, init = _target(scan=True, param_dtype=jnp.bfloat16)
  params, _ = load_pretrained(_npz(tmp_path), init, model=model, log=None)
  assert 'encoderblock' in params['Transformer']
  assert jax.tree.structure(params) == jax.tree.structure(init)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))


def test_grey_scale_target_sums_colour_channels(tmp_path):
  src = make_params('vit_jax')
  path = tmp_path / 'a.npz'
  write_npz(path, src)
  model, init = _target(channels=1)
  params, report = load_pretrained(path, init, model=model, log=None)
  assert report.reshaped == [('embedding/kernel', (4, 4, 3, D), (4, 4, 1, D))]
  x = images_of(channels=1)
  assert_close_to_scale(_logits(model, params, x), np_vit(src, np.repeat(x, 3, -1)), rtol=1e-5)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
  model, init = _target(hidden_size=48, num_heads=2)
  with pytest.raises(ValueError, match=r'the checkpoint has shape \(1, 17, 32\), the model '
                                       r'\(1, 17, 48\); the widths differ'):
    load_pretrained(_npz(tmp_path), init, model=model, log=None)
  model, init = _target(num_layers=3)
  with pytest.raises(ValueError, match=r'In the model but not the checkpoint: '
                                       r'Transformer/encoderblock_2/LayerNorm_0/bias \(32,\)'):
    load_pretrained(_npz(tmp_path), init, model=model, log=None)
  model, init = _target(num_layers=1)
  with pytest.raises(ValueError, match=r'In the checkpoint but not the model: '
                                       r'Transformer/encoderblock_1/LayerNorm_0/bias \(32,\)'):
    load_pretrained(_npz(tmp_path), init, model=model, log=None)


def test_unknown_file_is_a_clear_error(tmp_path):
  (tmp_path / 'x.bin').write_bytes(b'123')
  with pytest.raises(ValueError, match='not a checkpoint format this project reads; known: npz'):
    read_checkpoint(tmp_path / 'x.bin')
  with pytest.raises(FileNotFoundError):
    read_checkpoint(tmp_path / 'missing.npz')


def test_orbax_hook_reads_through_the_manager(tmp_path, monkeypatch):
  """The orbax reader is one registry entry calling manager.load_params(path) -> (tree, meta)."""
  src = make_params('vit_jax', classifier='gap')
  model_fields = {**dict(registry.get_model_config('ViT-testing')), 'classifier': 'gap'}
  model_fields.pop('name')
  model_fields.pop('family')
  # The meta dict as the trainer's run_meta wrote it before families existed (still read: a ViT).
  from vit_jax.checkpoints import manager
  monkeypatch.setattr(manager, 'load_params', lambda path: (
      vit_family.stack_blocks(params_lib.unflatten(src)), {
          'model': model_fields, 'model_name': 'ViT-testing', 'num_classes': CLASSES,
          'image_size': [16, 16], 'channels': 3, 'class_names': list('abcde'), 'step': 10}))
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.format == 'orbax' and ckpt.class_names == list('abcde')
  assert ckpt.architecture.image_size == (16, 16)
  assert ckpt.architecture.model_config['name'] == 'ViT-testing'
  assert set(ckpt.params) == set(src)  # Unstacked to the unscanned layout.
  model, init = _target(classifier='gap', num_classes=3)
  params, report = load_pretrained(tmp_path, init, model=model, log=None)
  assert sorted(report.added) == ['head/bias', 'head/kernel']


def test_orbax_checkpoint_written_by_the_manager(tmp_path):
  """The real hook: a workdir saved by checkpoints.manager reads back, and converts to npz."""
  from vit_jax.checkpoints import manager  # A renamed API must fail here, not skip.
  from vit_jax.families.base import Architecture
  src = make_params('vit_jax', classifier='gap', seed=8)
  fields = {**dict(registry.get_model_config('ViT-testing')), 'classifier': 'gap'}
  ckpt_manager = manager.CheckpointManager(str(tmp_path / 'checkpoints'), async_save=False,
                                           keep_best=False)
  state = {'params': params_lib.unflatten(src), 'step': np.asarray(3)}
  arch = Architecture(fields, CLASSES, (16, 16), 3, 'vit')
  ckpt_manager.save(3, state, {}, {'architecture': arch.to_meta(), 'class_names': list('abcde')})
  ckpt_manager.close()
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.format == 'orbax' and ckpt.class_names == list('abcde')
  assert all(ckpt.params[k].tobytes() == src[k].tobytes() for k in src)
  from vit_jax.convert import convert
  result = convert(tmp_path, 'npz', tmp_path / 'out.npz', verify=True, log=None)
  assert result.max_abs_diff == 0 and result.architecture.model_config['name'] == 'ViT-testing'
