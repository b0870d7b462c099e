"""MLP-Mixer <-> timm (`vit_jax.families.mixer_interop`): logits, bitwise round trips, timm's
registry names and a timm directory export (CPU torch; timm through
vit_jax/convert/torchvision_stub)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_logits_match
from tests.test_mixer import COUNTS, TINY, _images, _model, _random_params, model_fields
from vit_jax.families import mixer as fam
from vit_jax.families import mixer_interop
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.params import flatten, unflatten


@pytest.fixture(scope='module')
def timm():
  from tests import interop  # pylint: disable=import-outside-toplevel
  return interop.require_timm()[1]  # under scripts/test.sh a failure, not a skip


def _timm_tiny(timm, act_layer=None, img_size=(16, 24), num_classes=5):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  kw = {} if act_layer is None else dict(act_layer=act_layer)
  # timm's `mixer_*_224` functions fix patch_size/num_blocks/embed_dim, so tiny sizes need the class.
  model = timm.models.mlp_mixer.MlpMixer(img_size=img_size, patch_size=4, num_blocks=2,
                                         embed_dim=32, mlp_ratio=(0.5, 2.0),
                                         num_classes=num_classes, **kw).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))  # the zero head and unit LayerNorms too
  return model


def _timm_run(model, images, features=False):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    return (model.forward_features(x) if features else model(x)).numpy()


@pytest.mark.parametrize('act', ['gelu', 'gelu_tanh'])
def test_timm_weights_give_timms_logits(timm, act):
  import torch  # pylint: disable=import-outside-toplevel
  act_layer = None if act == 'gelu' else functools.partial(torch.nn.GELU, approximate='tanh')
  tmodel = _timm_tiny(timm, act_layer)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  fields, tokens, classes, channels = mixer_interop.fields_from_timm_state(sd)
  assert (tokens, classes, channels) == (24, 5, 3)
  fields['act'] = act
  flat = mixer_interop.from_timm(sd, fields)
  model = MlpMixer(num_classes=classes, **fields)
  x = _images(16, 24, seed=4)
  want = _timm_run(tmodel, x)
  got = np.asarray(model.apply({'params': unflatten(flat)}, x))
  diff = assert_logits_match(got, want, what=act)
  print(f'timm MlpMixer ({act}) max |logit diff| {diff:.3g}, logit scale {np.abs(want).max():.3g}')
  # The token map is row-major like timm's [B, N, D] sequence after `norm`.
  feats = np.asarray(model.apply({'params': unflatten(flat)}, x, features=True)[0])
  assert_close_to_scale(feats.reshape(2, 24, 32), _timm_run(tmodel, x, features=True), rtol=1e-5)
  if act == 'gelu':  # Exact vs tanh GELU is a visible difference, so the act field matters.
    other = MlpMixer(num_classes=classes, **{**fields, 'act': 'gelu_tanh'})
    assert np.abs(np.asarray(other.apply({'params': unflatten(flat)}, x)) - want).max() > 1e-4


def test_timm_state_round_trip_is_bitwise(timm):
  sd = {k: v.numpy() for k, v in _timm_tiny(timm).state_dict().items()}
  fields = mixer_interop.fields_from_timm_state(sd)[0]
  back = mixer_interop.to_timm(mixer_interop.from_timm(sd, fields), fields)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  with pytest.raises(ValueError, match='not part of an MlpMixer'):
    mixer_interop.from_timm({**sd, 'blocks.0.ls1': sd['norm.bias']}, fields)


def test_export_builds_in_timm_with_the_same_logits(timm):
  import torch  # pylint: disable=import-outside-toplevel
  model = _model(num_classes=3, act='gelu')
  x = _images(16, 24, seed=5)
  flat = flatten(_random_params(model, x))
  fields = {**model_fields(model), 'act': 'gelu'}
  args = mixer_interop.timm_model_args(fields, 3, (16, 24))
  tmodel = timm.models.mlp_mixer.MlpMixer(**args).eval()
  state = mixer_interop.to_timm(flat, fields)
  tmodel.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()},
                         strict=True)
  want = _timm_run(tmodel, x)
  assert_logits_match(model.apply({'params': unflatten(flat)}, x), want)


@pytest.mark.parametrize('timm_name,ours', sorted(mixer_interop.TIMM_NAMES.items()))
def test_timm_registry_counts_and_create_args(timm, timm_name, ours):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.device('meta'):  # shapes only, nothing allocated
    tmodel = timm.create_model(timm_name, pretrained=False)
  assert sum(p.numel() for p in tmodel.parameters()) == COUNTS[ours]
  assert mixer_interop.fields_from_timm_name(timm_name) == {**fam.MODELS[ours], 'act': 'gelu'}
  # timm.create_model(name, **model_args) at another image size and head builds our shapes.
  name, args = mixer_interop.timm_create_args(fam.MODELS[ours], 10, (64, 96))
  assert name == timm_name
  with torch.device('meta'):
    tmodel = timm.create_model(name, pretrained=False, **args)
  ours_shapes = jax.eval_shape(MlpMixer(num_classes=10, **fam.MODELS[ours]).init,
                               jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)))
  # Same tensors up to layout (Dense kernels are transposed Linear weights, HWIO vs OIHW): compare
  # the multisets of sorted shapes, which needs no arrays at L/16 size.
  canon = lambda shapes: sorted(tuple(sorted(s)) for s in shapes)
  assert canon(v.shape for v in tmodel.state_dict().values()) == \
      canon(x.shape for x in jax.tree.leaves(ours_shapes))
  assert len(tmodel.state_dict()) == len(jax.tree.leaves(ours_shapes))


def test_timm_create_args_refuses_unregistered_sizes():
  with pytest.raises(ValueError, match='only at the paper.s sizes'):
    mixer_interop.timm_create_args(TINY, 5, 16)


def test_timm_directory_round_trip_at_a_registered_size(timm, tmp_path):
  """Mixer-S_32 at 64 px (4 tokens): config.json rebuilds it in timm with the same logits."""
  import torch  # pylint: disable=import-outside-toplevel
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import timm as timm_format  # pylint: disable=import-outside-toplevel
  fields = {**fam.MODELS['Mixer-S_32'], 'act': 'gelu'}
  rng = np.random.RandomState(0)
  flat = {k: (rng.normal(size=s) / np.sqrt(s[0] if len(s) == 2 else 1) * (0.5 if len(s) > 1 else
             0.2) + (k.endswith('scale'))).astype(np.float32)
          for k, s in mixer_interop.npz_shapes(fields, 4, 6).items()}
  arch = Architecture(dict(fields, name='Mixer-S_32'), 6, (64, 64), family='mixer')
  timm_format.write_timm(tmp_path, flat, arch, class_names=list('abcdef'))
  config = timm_format.load_config(str(tmp_path))
  assert config['architecture'] == 'mixer_s32_224'
  tmodel = timm.create_model(config['architecture'], pretrained=True, pretrained_cfg_overlay=dict(
      file=str(tmp_path / 'model.safetensors'), num_classes=6), **config['model_args']).eval()
  x = _images(64, 64, seed=6)
  want = _timm_run(tmodel, x)
  ours = np.asarray(arch.create_model().apply({'params': unflatten(flat)}, x))
  print(f'timm mixer_s32_224 export: max |logit diff| {np.abs(ours - want).max():.3g}')
  assert_logits_match(ours, want)
  back, back_arch, info = timm_format.read_timm(tmp_path)
  assert back_arch.family == 'mixer' and back_arch.image_size == (64, 64)
  assert back_arch.model_config['name'] == 'Mixer-S_32' and back_arch.num_classes == 6
  assert sorted(back) == sorted(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
  assert info['class_names'] == list('abcdef')
  del torch


def test_to_timm_refuses_sizes_timm_cannot_build():
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  arch = Architecture(dict(TINY), 5, (16, 16), family='mixer')
  with pytest.raises(ValueError, match='only at the paper.s sizes'):
    mixer_interop.INTEROP.to_timm({}, arch)
