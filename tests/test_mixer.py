"""MLP-Mixer: sizes, the paper's equations, Google's npz layout and the family descriptor (tiny
models); the timm key maps are tested in test_mixer_interop.py."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_trees_close_to_scale
from vit_jax.families import mixer as fam
from vit_jax.families import mixer_interop
from vit_jax.families import registry
from vit_jax.models.mixer import MixerBlock, MlpMixer
from vit_jax.models.params import count, flatten, unflatten

TINY = fam.MODELS['Mixer-testing']  # patch 4, 2 blocks, hidden 32, tokens 16, channels 64
# timm 1.0.31 `mixer_*_224` parameter counts at 224 px, 1000 classes.
COUNTS = {'Mixer-S_16': 18_528_264, 'Mixer-S_32': 19_104_624, 'Mixer-B_16': 59_880_472,
          'Mixer-B_32': 60_293_428, 'Mixer-L_16': 208_196_168, 'Mixer-L_32': 206_939_264}


def _model(num_classes=5, **kw) -> MlpMixer:
  return MlpMixer(num_classes=num_classes, **{**TINY, **kw})


def _images(h=16, w=16, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)


def _perturbed(params, seed=1, std=0.2):
  """Every parameter (zero head and LayerNorm ones included) moved, so each one matters."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: (np.asarray(x) + std * rng.normal(size=x.shape)).astype(np.float32),
                      params)


def _random_params(module, *inputs, seed=1, std=0.2):
  """Random parameters of the module's shapes (LayerNorm scales around 1), without compiling init."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)['params']
  return _perturbed(jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, float(path[-1].key == 'scale'), np.float32), shapes),
      seed, std)


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_registered_sizes_have_timms_parameter_counts(name):
  model = MlpMixer(num_classes=1000, **fam.MODELS[name])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count(shapes) == COUNTS[name]


def test_forward_and_features_shapes():
  model, x = _model(), _images(16, 24)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert model.apply({'params': params}, x).shape == (2, 5)
  feats = model.apply({'params': params}, x, features=True)
  assert len(feats) == 1 and feats[0].shape == (2, 4, 6, 32)
  assert _model(num_classes=0).apply({'params': {k: v for k, v in params.items() if k != 'head'}},
                                     x).shape == (2, 32)
  # Zero-initialised head, as Google's recipe: logits start at exactly 0.
  assert not np.any(np.asarray(model.apply({'params': params}, x)))


def _np_layernorm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_gelu(x, act):
  if act == 'gelu':
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize('act', ['gelu_tanh', 'gelu'])
def test_block_matches_the_papers_equations(act):
  """U = X + W2 σ(W1 LN(X)^T)^T ; Y = U + W4 σ(W3 LN(U)), in float64 numpy."""
  block = MixerBlock(tokens_mlp_dim=12, channels_mlp_dim=40, act=act)
  x = np.random.RandomState(3).normal(size=(2, 9, 16)).astype(np.float32)
  p = _random_params(block, x, std=0.3)
  f = {k: np.asarray(v, np.float64) for k, v in flatten(p).items()}
  mlp = lambda z, m: (_np_gelu(z @ f[f'{m}/Dense_0/kernel'] + f[f'{m}/Dense_0/bias'], act)
                      @ f[f'{m}/Dense_1/kernel'] + f[f'{m}/Dense_1/bias'])
  x64 = x.astype(np.float64)
  y = _np_layernorm(x64, f['LayerNorm_0/scale'], f['LayerNorm_0/bias'])
  u = x64 + mlp(y.transpose(0, 2, 1), 'token_mixing').transpose(0, 2, 1)
  want = u + mlp(_np_layernorm(u, f['LayerNorm_1/scale'], f['LayerNorm_1/bias']), 'channel_mixing')
  got = block.apply({'params': p}, x)
  assert_close_to_scale(got, want, rtol=1e-5, what='MixerBlock')
  assert np.abs(want - x64).max() > 0.1  # the block does something


def test_token_count_is_tied_to_the_parameters():
  model = _model()
  params = _random_params(model, _images(16, 16))
  with pytest.raises(ValueError, match=r'mix 16 tokens, but the images give 25'):
    model.apply({'params': params}, _images(20, 20))
  # Same token count, other aspect ratio: the parameters fit (4x4 = 2x8 patches).
  assert model.apply({'params': params}, _images(8, 32)).shape == (2, 5)
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    model.apply({'params': params}, _images(18, 16))
  fam.check_image_size(TINY, 16, 16)
  with pytest.raises(ValueError, match=r'mix 16 tokens, but 32x32 px images give 64'):
    fam.check_image_size(TINY, 32, 16)


def test_unknown_activation_is_a_clear_error():
  with pytest.raises(ValueError, match="act 'relu' is not one of"):
    _model(act='relu').init(jax.random.PRNGKey(0), _images())


def test_stochastic_depth_and_dropout_only_in_training():
  model = _model(stochastic_depth=0.5)
  x = _images()
  params = _random_params(model, x)
  run = lambda seed, train=True: np.asarray(model.apply(
      {'params': params}, x, train=train, rngs={'dropout': jax.random.PRNGKey(seed)}))
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  np.testing.assert_array_equal(run(0, train=False), model.apply({'params': params}, x))
  # Nothing to drop: training equals evaluation.
  plain = _model()
  assert_close_to_scale(plain.apply({'params': params}, x, train=True,
                                    rngs={'dropout': jax.random.PRNGKey(0)}),
                        plain.apply({'params': params}, x), rtol=1e-6, what='train = eval')
  dropout = _model(dropout_rate=0.3)
  assert not np.allclose(dropout.apply({'params': params}, x, train=True,
                                       rngs={'dropout': jax.random.PRNGKey(0)}),
                         dropout.apply({'params': params}, x))


def test_remat_matches_plain():
  x = _images()
  plain, remat = _model(), _model(remat=True)
  params = _random_params(plain, x)
  assert jax.tree.structure(_random_params(remat, x)) == jax.tree.structure(params)
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)
  g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
  assert_trees_close_to_scale(g2, g1, rtol=1e-5)
  assert any(float(jnp.max(jnp.abs(g))) > 0.1 for g in jax.tree.leaves(g1))


def test_flat_params_are_googles_npz_layout(tmp_path):
  model = MlpMixer(num_classes=7, patch_size=4, num_blocks=1, hidden_dim=32, tokens_mlp_dim=16,
                   channels_mlp_dim=64)
  x = _images()
  flat = flatten(_random_params(model, x))
  # Google's models_mixer.py names, written out by hand (not derived from the code under test).
  google = ['stem/kernel', 'stem/bias', 'pre_head_layer_norm/scale', 'pre_head_layer_norm/bias',
            'head/kernel', 'head/bias'] + [
                f'MixerBlock_0/{m}/{p}' for m in ('LayerNorm_0', 'LayerNorm_1')
                for p in ('scale', 'bias')] + [
                f'MixerBlock_0/{m}/Dense_{j}/{p}' for m in ('token_mixing', 'channel_mixing')
                for j in (0, 1) for p in ('kernel', 'bias')]
  assert sorted(flat) == sorted(google)
  assert flat['MixerBlock_0/token_mixing/Dense_0/kernel'].shape == (16, 16)  # [tokens, D_S]
  mixer_interop.check_npz_layout(flat, model_fields(model), num_tokens=16, num_classes=7)

  np.savez(tmp_path / 'mixer.npz', **flat)
  with np.load(tmp_path / 'mixer.npz', allow_pickle=False) as npz:
    loaded = {k: npz[k] for k in npz.files}
  fields, tokens, classes, channels = fam.infer_fields(loaded)
  assert (fields, tokens, classes, channels) == (model_fields(model), 16, 7, 3)
  np.testing.assert_array_equal(model.apply({'params': unflatten(loaded)}, x),
                                model.apply({'params': unflatten(flat)}, x))
  # Training checkpoints carry an optimizer-state prefix; the parameters are found under it.
  saved = {**{f'opt/target/{k}': v for k, v in flat.items()}, 'opt/state/step': np.zeros(())}
  assert sorted(mixer_interop.strip_prefix(saved)) == sorted(flat)

  renamed = dict(flat)
  renamed['MixerBlock_0/MlpBlock_0/Dense_0/kernel'] = renamed.pop(
      'MixerBlock_0/channel_mixing/Dense_0/kernel')
  with pytest.raises(ValueError, match='not Google.s Mixer .npz layout'):
    mixer_interop.check_npz_layout(renamed, fields, num_tokens=16, num_classes=7)
  with pytest.raises(ValueError, match='wrong shapes'):
    mixer_interop.check_npz_layout(flat, fields, num_tokens=25, num_classes=7)


def model_fields(model: MlpMixer) -> dict:
  return {k: getattr(model, k) for k in fam.SIZE_FIELDS}


def test_registry_names():
  assert mixer_interop.fields_from_timm_name('mixer_b16_224.goog_in21k') == {
      **fam.MODELS['Mixer-B_16'], 'act': 'gelu'}
  with pytest.raises(ValueError, match='not one of timm'):
    mixer_interop.fields_from_timm_name('resmlp_12_224')


# ---------- the family descriptor ----------

def test_family_is_registered_and_builds_the_module():
  family = registry.get_family('mixer')
  assert family is fam.FAMILY and registry.family_of('Mixer-B_16') is family
  assert set(registry.names('mixer')) == set(fam.MODELS)
  model = registry.create_model(registry.get_model_config('Mixer-testing'), 5, act='gelu')
  assert isinstance(model, MlpMixer) and model.act == 'gelu' and model.hidden_dim == 32
  with pytest.raises(ValueError, match='unknown field'):
    registry.create_model(registry.get_model_config('Mixer-testing'), 5, num_heads=2)
  flat = flatten(_random_params(_model(), _images()))
  assert registry.detect(flat) is family
  interop = registry.interop('mixer')
  assert interop is mixer_interop.INTEROP and interop.family is family
  assert interop.npz_keys_ok(flat) == []
  assert interop.npz_keys_ok({**flat, 'MixerBlock_0/MlpBlock_0/bias': 0}) == [
      'MixerBlock_0/MlpBlock_0/bias']


def test_forward_macs():
  # Mixer-B/16 at 224: stem 196*768*768 + 12 * (2*196*384*768 + 2*196*768*3072) + 768*1000
  # = 12.60 GMACs (timm's table lists 12.62 for mixer_b16_224, counting the norms too).
  macs = fam.FAMILY.forward_macs(fam.MODELS['Mixer-B_16'], 1000, (224, 224))
  assert macs == 115_605_504 + 12 * 1_040_449_536 + 768_000
  # Tiny model at 16x24: 24 tokens.
  assert fam.FAMILY.forward_macs(TINY, 5, (16, 24)) == (
      24 * 48 * 32 + 2 * (2 * 24 * 16 * 32 + 2 * 24 * 32 * 64) + 32 * 5)


def test_family_validate():
  fam.FAMILY.validate(TINY, (16, 24))
  with pytest.raises(ValueError, match='multiple of the Mixer patch size'):
    fam.FAMILY.validate(TINY, (18, 24))
  with pytest.raises(ValueError, match="model.act 'relu'"):
    fam.FAMILY.validate({**TINY, 'act': 'relu'}, (16, 16))


def test_infer_reads_the_architecture_and_refuses_other_token_counts():
  model = _model(num_classes=7)
  flat = flatten(_random_params(model, _images(16, 24)))
  arch = fam.FAMILY.infer(flat, image_size=(16, 24))
  assert arch.family == 'mixer' and arch.num_classes == 7 and arch.image_size == (16, 24)
  assert {k: arch.model_config[k] for k in fam.SIZE_FIELDS} == TINY
  assert arch.create_model().hidden_dim == 32
  with pytest.raises(ValueError, match='not a perfect square|square'):
    fam.FAMILY.infer(flat)  # 24 tokens: no square grid, the aspect ratio must be given
  with pytest.raises(ValueError, match=r'mix 24 tokens, but 16x16 px images give 16'):
    fam.FAMILY.infer(flat, image_size=16)
  with pytest.raises(ValueError, match=r'hidden_dim=32 \(the config has 64\)'):
    fam.FAMILY.infer(flat, model_config={**TINY, 'hidden_dim': 64}, image_size=(16, 24))
  square = flatten(_random_params(model, _images(16, 16)))
  assert fam.FAMILY.infer(square).image_size == (16, 16)


def test_transfer_to_another_token_count_is_an_error_unless_resampling_is_asked_for():
  from vit_jax.checkpoints.pretrained import LoadReport  # pylint: disable=import-outside-toplevel
  src = flatten(_random_params(_model(), _images(16, 16)))
  target = flatten(_random_params(_model(), _images(32, 32)))
  src_arch = fam.FAMILY.infer(src)
  with pytest.raises(ValueError, match='mixes 16 tokens.*has 64.*posemb_resize'):
    fam.FAMILY.adapt(src, target, src_arch, TINY, (32, 32), fam.FAMILY.default_resize, None)
  assert fam.FAMILY.adapt(src, src, src_arch, TINY, (16, 16), 'none', None) is src
  # Asked for: the token axis is resampled over the 4x4 -> 8x8 grid, every shape fits the target.
  report = LoadReport('src', 'test')
  out = fam.FAMILY.adapt(src, target, src_arch, TINY, (32, 32), 'bilinear', report)
  assert all(np.shape(out[k]) == np.shape(target[k]) for k in target)
  assert len(report.reshaped) == 3 * TINY['num_blocks'] and 'bilinear' in report.notes[-1]
  # A token-mixing kernel constant over the tokens keeps the Dense_0 output of a constant token
  # map: the S/S' scale makes the sum over four times as many tokens the same size.
  key = 'MixerBlock_0/token_mixing/Dense_0/kernel'
  const = {**src, key: np.tile(src[key][:1], (16, 1))}
  out = fam.FAMILY.adapt(const, target, src_arch, TINY, (32, 32), 'bicubic', LoadReport('s', 't'))
  np.testing.assert_allclose(out[key].sum(0), const[key].sum(0), rtol=1e-5)


def test_tensor_rules_split_the_hidden_units_of_both_mlps():
  import re  # pylint: disable=import-outside-toplevel
  flat = flatten(_random_params(_model(), _images()))
  hidden = {'token_mixing': TINY['tokens_mlp_dim'], 'channel_mixing': TINY['channels_mlp_dim']}
  for key, value in flat.items():
    rule = next((r for p, r in fam.TENSOR_RULES if re.search(p, key)), None)
    m = re.search(r'(token_mixing|channel_mixing)/Dense_([01])/(kernel|bias)$', key)
    if m and (m.group(2), m.group(3)) != ('1', 'bias'):
      assert rule is not None and len(rule) == value.ndim, key
      split = [value.shape[i] for i, ax in enumerate(rule) if ax == 'tensor']
      assert split == [hidden[m.group(1)]], key  # exactly the hidden axis
    else:
      assert not rule, key  # replicated


def test_load_pretrained_resamples_token_mixing_only_when_asked(tmp_path):
  """A 16x16-px (16-token) Mixer .npz into a 32x32-px (64-token) model through load_pretrained."""
  from vit_jax.checkpoints import load_pretrained  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints.npz import write_npz  # pylint: disable=import-outside-toplevel
  write_npz(tmp_path / 'm.npz', flatten(_random_params(_model(), _images(16, 16))))
  model = _model(num_classes=3)
  init = model.init(jax.random.PRNGKey(0), _images(32, 32))['params']
  with pytest.raises(ValueError, match='posemb_resize'):
    load_pretrained(tmp_path / 'm.npz', init, model=model, image_size=(32, 32), log=None)
  params, report = load_pretrained(tmp_path / 'm.npz', init, model=model, image_size=(32, 32),
                                   posemb_resize='bilinear', log=None)
  assert sorted(report.added) == ['head/bias', 'head/kernel']  # 5 -> 3 classes
  assert any('token-mixing' in n for n in report.notes)
  assert model.apply({'params': params}, _images(32, 32)).shape == (2, 3)
