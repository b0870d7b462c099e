"""The backbone API (`vit_jax.models.backbone`, issue M §3) of Mixer, Swin and PVT v2: intermediate
token maps equal to timm's `forward_intermediates` on the same (perturbed) weights, and calls at
other image sizes equal to building the model at that size (Swin: its bias tables resampled by the
checkpoint transfer's method, inside the jitted call; Mixer: refused). Also the shared pieces:
`take_indices`, the in-jit resampling operators, and every family that declares the API.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_logits_match
from vit_jax.families import registry
from vit_jax.models import backbone
from vit_jax.models import params as params_lib
from vit_jax.models import resize

# Stage / block outputs of float32 models through a few blocks, summed in another order by torch:
# measured <= 1.3e-6 of each map's scale (printed below); 1e-5 leaves room for other CPUs.
RTOL = 1e-5


@pytest.fixture(scope='module')
def timm():
  from tests import interop  # pylint: disable=import-outside-toplevel
  return interop.require_timm()  # (torch, timm); under scripts/test.sh a failure, not a skip


def _nchw(x: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _timm_inter(model, x, indices, norm):
  """timm's forward_intermediates as NHWC numpy maps."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    maps = model.forward_intermediates(_nchw(x), indices=list(indices), norm=norm,
                                       output_fmt='NCHW', intermediates_only=True)
  return [m.numpy().transpose(0, 2, 3, 1) for m in maps]


def _compare(ours: dict, theirs: list, take: list, what: str) -> float:
  """Our backbone dict (one map per index of `take`, in that order) against timm's maps (one per
  distinct index, in depth order): equal maps, [B, 0, D] prefixes; returns the worst
  |diff| / scale."""
  depth_order = sorted(set(take))
  assert len(ours['maps']) == len(take) and len(theirs) == len(depth_order)
  worst = 0.0
  for i, (a, s) in enumerate(zip(ours['maps'], take)):
    b = theirs[depth_order.index(s)]
    assert_close_to_scale(a, b, rtol=RTOL, what=f'{what} map {i}')
    worst = max(worst, float(np.abs(np.asarray(a) - b).max() / np.abs(b).max()))
  assert [p.shape for p in ours['prefix']] == [(m.shape[0], 0, m.shape[-1]) for m in ours['maps']]
  return worst


def _images(h, w, seed=0, b=2):
  return np.random.RandomState(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _jit_apply(model, params, x, **kwargs):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, **kwargs))(params, jnp.asarray(x))


# ---------- shared pieces ----------

def test_take_indices_follows_timm_and_names_the_range():
  assert backbone.take_indices((0, -1, 2), 4) == [0, 3, 2]
  assert backbone.take_indices(2, 4) == [2, 3]  # an int n: the last n (timm)
  with pytest.raises(ValueError, match=r'index 4 is out of range: the model has 4 stages '
                                       r'\(indices -4..3'):
    backbone.take_indices((4,), 4, 'stages')
  with pytest.raises(ValueError, match='index -5 is out of range'):
    backbone.take_indices([-5], 4)
  with pytest.raises(ValueError, match='the last 5 blocks, but the model has 4'):
    backbone.take_indices(5, 4)
  with pytest.raises(ValueError, match='intermediates is empty'):
    backbone.take_indices((), 4)
  with pytest.raises(ValueError, match='must be a sequence'):
    backbone.take_indices('0', 4)


@pytest.mark.parametrize('method', resize.RELATIVE_RESIZE_METHODS)
@pytest.mark.parametrize('old,new', [(4, 2), ((3, 5), (4, 6))])
def test_in_jit_table_resize_is_the_transfer_method(method, old, new):
  """The jitted operator form equals the numpy function checkpoint transfer uses, and the gradient
  reaches the stored table."""
  (oh, ow) = (old, old) if np.ndim(old) == 0 else old
  table = np.random.RandomState(1).normal(size=((2 * oh - 1) * (2 * ow - 1), 3)).astype(np.float32)
  want = resize.resize_relative_position_bias(table, old, new, method)
  got = jax.jit(lambda t: resize.resize_relative_table(t, old, new, method))(table)
  # One [R', R] matmul in float32 against the method's own arithmetic: a few eps of the scale.
  assert_close_to_scale(got, want, rtol=1e-6, what=method)
  grad = jax.grad(lambda t: resize.resize_relative_table(t, old, new, method).sum())(table)
  assert grad.shape == table.shape and float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize('method', resize.METHODS)
def test_grid_operator_is_resample_grid(method):
  grid = np.random.RandomState(2).normal(size=(3, 5, 4)).astype(np.float32)
  op = resize.grid_operator((3, 5), (6, 4), method)
  want = resize.resample_grid(grid, (6, 4), method)
  assert_close_to_scale((op @ grid.reshape(15, 4)).reshape(6, 4, 4), want, rtol=1e-6)


def _declared(attribute):
  return [f.name for f in registry.families() if getattr(f, attribute)]


@pytest.mark.parametrize('name', _declared('intermediate_unit'))
def test_every_declaring_family_returns_maps_per_index(name):
  """Registry-wide: the family's test model returns one [B, h, w, D] map and one [B, P, D] prefix
  per index, in the order given, for negative indices too; drop_prefix leaves 'prefix' out; a bad
  index is a ValueError naming the count."""
  from tests.test_mixer import _random_params  # pylint: disable=import-outside-toplevel
  family = registry.get_family(name)
  model = family.create(registry.get_model_config(family.test_model), 5)
  size = family.test_image_size
  x = jnp.asarray(_images(size, size))
  params = _random_params(model, x[:1])
  # One compile for both calls.
  out, again = jax.jit(lambda p, x: (
      model.apply({'params': p}, x, intermediates=(-1, 0)),
      model.apply({'params': p}, x, intermediates=(0,), drop_prefix=True)))(params, x)
  assert set(out) == {'maps', 'prefix'} and len(out['maps']) == 2 == len(out['prefix'])
  for m, p in zip(out['maps'], out['prefix']):
    assert m.ndim == 4 and m.shape[0] == 2 and p.ndim == 3 and p.shape[::2] == m.shape[::3]
  assert set(again) == {'maps'}
  np.testing.assert_array_equal(again['maps'][0], out['maps'][1])
  with pytest.raises(ValueError, match=f'the model has .* {family.intermediate_unit}'):
    model.apply({'params': params}, x, intermediates=(99,))
  assert family.call_time_size in ('any', 'dynamic_img_size', 'fixed')
  if family.call_time_size == 'fixed':
    assert family.lacks.get('dynamic_img_size')


def _variants(model, params, x, calls):
  """model.apply under several keyword sets, in one compile: a list of outputs."""
  return jax.jit(lambda p, x: [model.apply({'params': p}, x, **kw) for kw in calls])(
      params, jnp.asarray(x))


# ---------- MLP-Mixer ----------

def test_mixer_intermediates_match_timm(timm):
  from tests.test_mixer_interop import _timm_tiny  # pylint: disable=import-outside-toplevel
  from vit_jax.families import mixer_interop  # pylint: disable=import-outside-toplevel
  from vit_jax.models.mixer import MlpMixer  # pylint: disable=import-outside-toplevel
  tmodel = _timm_tiny(timm[1])  # 2 blocks, width 32, 16x24 px in 4x6 patches, perturbed
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  fields, _, classes, _ = mixer_interop.fields_from_timm_state(sd)
  model = MlpMixer(num_classes=classes, **dict(fields, act='gelu'))
  params = params_lib.unflatten(mixer_interop.from_timm(sd, fields))
  x = _images(16, 24, seed=3)
  cases = [((0, 1), False), ((-1, 0), True)]
  outs = _variants(model, params, x, [dict(intermediates=i, norm=n) for i, n in cases] +
                   [dict(features=True)])
  for (indices, norm), ours in zip(cases, outs):
    take = backbone.take_indices(indices, 2)
    worst = _compare(ours, _timm_inter(tmodel, x, take, norm), take, f'mixer {indices} {norm}')
    print(f'Mixer intermediates {indices} norm={norm}: max |diff| / scale vs timm {worst:.3g}')
  # features=True is the last block after the norm.
  np.testing.assert_array_equal(outs[2][0], outs[1]['maps'][0])


def test_mixer_refuses_another_image_size_naming_the_reason():
  from tests.test_mixer import _random_params  # pylint: disable=import-outside-toplevel
  family = registry.get_family('mixer')
  config = registry.get_model_config('Mixer-testing')
  model = family.create(config, 5)
  params = {'params': _random_params(model, jnp.zeros((1, 16, 16, 3)))}
  with pytest.raises(ValueError, match='token-mixing MLPs hold one weight per token position'):
    model.clone(dynamic_img_size=True).apply(params, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match='mix 16 tokens, but the images give 36'):
    model.apply(params, jnp.zeros((1, 24, 24, 3)), intermediates=(0,))
  with pytest.raises(ValueError, match='cannot be True for a Mixer: its token-mixing MLPs'):
    family.validate(dict(config, dynamic_img_size=True), (16, 16))
  assert family.call_time_size == 'fixed'


# ---------- Swin ----------

def _swin_from_timm(timm, fields, image_size, **ours):
  from tests.test_swin_interop import _timm_model  # pylint: disable=import-outside-toplevel
  from vit_jax.families.swin_interop import from_timm  # pylint: disable=import-outside-toplevel
  from vit_jax.models.swin import SwinTransformer  # pylint: disable=import-outside-toplevel
  tmodel = _timm_model(timm, fields, image_size)
  flat = from_timm({k: v.numpy() for k, v in tmodel.state_dict().items()}, fields)
  return tmodel, SwinTransformer(num_classes=5, **fields, **ours), params_lib.unflatten(flat)


def _to_timm(params, fields):
  import torch  # pylint: disable=import-outside-toplevel
  from vit_jax.families.swin_interop import to_timm  # pylint: disable=import-outside-toplevel
  flat = params if '/' in next(iter(params)) else params_lib.flatten_numpy(params)
  return {k: torch.from_numpy(np.asarray(v)) for k, v in to_timm(flat, fields).items()}


SWIN = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))  # testing


def test_swin_intermediates_match_timm(timm):
  # Two stages on 16x16 and 8x8 maps, windows 4, the odd blocks shifted.
  tmodel, model, params = _swin_from_timm(timm[1], SWIN, (32, 32))
  x = _images(32, 32, seed=5)
  cases = [((0, 1), False), ((-1, 0), True)]
  outs = _variants(model, params, x, [dict(intermediates=i, norm=n) for i, n in cases] +
                   [dict(features=True)])
  for (indices, norm), ours in zip(cases, outs):
    take = backbone.take_indices(indices, 2)
    worst = _compare(ours, _timm_inter(tmodel, x, take, norm), take, f'swin {indices} {norm}')
    print(f'Swin intermediates {indices} norm={norm}: max |diff| / scale vs timm {worst:.3g}')
  # norm=True norms the last stage only (the final norm is sized for it); features=True: no norm.
  np.testing.assert_array_equal(outs[1]['maps'][1], outs[0]['maps'][0])
  assert float(jnp.abs(outs[1]['maps'][0] - outs[0]['maps'][1]).max()) > 0.1
  for a, b in zip(outs[2], outs[0]['maps']):
    np.testing.assert_array_equal(a, b)


def test_swin_built_at_224_runs_at_320x240_as_built_there(timm):
  """The issue's example on a narrow Swin-T shape (patch 4, window 7, four stages): at 320x240 the
  maps are 80x60 ... 10x8 (merging pads 15 rows to 16), every window stays 7 (so no table changes)
  and the last stage now shifts; equal to timm built at 320x240 with the same weights."""
  torch, timm_ = timm
  from tests.test_swin_interop import _timm_model  # pylint: disable=import-outside-toplevel
  fields = dict(patch_size=4, window_size=7, embed_dim=8, depths=(2, 2, 2, 2),
                num_heads=(1, 1, 2, 2))
  _, model, params = _swin_from_timm(timm_, fields, (224, 224))
  there = _timm_model(timm_, fields, (320, 240))
  there.load_state_dict(_to_timm(params, fields), strict=True)
  x = _images(320, 240, seed=6, b=1)
  with torch.no_grad():
    want = there(_nchw(x)).numpy()
  logits, inter = _variants(model, params, x, [{}, dict(intermediates=(0, 1, 2, 3), norm=True)])
  diff = assert_logits_match(logits, want)
  assert [m.shape[1:3] for m in inter['maps']] == [(80, 60), (40, 30), (20, 15), (10, 8)]
  worst = _compare(inter, _timm_inter(there, x, (0, 1, 2, 3), True), [0, 1, 2, 3], '320x240')
  print(f'Swin (224-built) at 320x240 vs timm built there: max |logit diff| {diff:.3g}, '
        f'maps {worst:.3g} of scale')


@pytest.fixture(scope='module')
def swin_32():
  """Perturbed parameters of the two-stage test Swin built at 32 px (16x16, 8x8 maps; windows 4)."""
  from tests.test_mixer import _random_params  # pylint: disable=import-outside-toplevel
  from vit_jax.families import swin as swin_family  # pylint: disable=import-outside-toplevel
  from vit_jax.models.swin import SwinTransformer  # pylint: disable=import-outside-toplevel
  model = SwinTransformer(num_classes=5, **SWIN)
  flat = params_lib.flatten_numpy(_random_params(model, jnp.zeros((1, 32, 32, 3)), seed=7))
  return model, flat, swin_family.FAMILY.infer(flat, image_size=(32, 32))


def test_swin_tables_resampled_in_the_call_equal_the_checkpoint_transfer(swin_32, tmp_path):
  """Built at 32 px, called at 12: maps 6x6 (window 4, shifted by 2, padded to 8x8) and 3x3, where
  stage 1's window shrinks to 3 (its tables, 7x7 -> 5x5 offsets). Refused without
  dynamic_img_size; with it, equal to building at 12 and loading the 32-px checkpoint through the
  transfer (`load_pretrained`, bicubic: the family's default, and the field's); one trace per
  shape."""
  from tests.test_mixer import _random_params  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints import load_pretrained  # pylint: disable=import-outside-toplevel
  from vit_jax.formats.timm import write_timm  # pylint: disable=import-outside-toplevel
  model, flat, arch = swin_32
  params = params_lib.unflatten(flat)
  x = _images(12, 12, seed=8)
  with pytest.raises(ValueError, match='stage_1/block_0/attn: the relative position bias table has '
                                       '49 rows, but at this image size the window is 3x3'):
    model.apply({'params': params}, x)
  write_timm(tmp_path, flat, arch)
  moved, report = load_pretrained(tmp_path, _random_params(model, jnp.zeros((1, 12, 12, 3))),
                                  model=model, image_size=(12, 12), log=None)
  assert [r[0] for r in report.reshaped] == [f'stage_1/block_{b}/attn/relative_position_bias_table'
                                             for b in (0, 1)]
  dynamic = model.clone(dynamic_img_size=True)
  traces = []
  def run(p, images):
    traces.append(images.shape)
    return (dynamic.apply({'params': p}, images),
            dynamic.apply({'params': p}, images, intermediates=(0, 1), norm=True))
  run = jax.jit(run)
  logits, inter = run(params, jnp.asarray(x))
  want_logits, want = _variants(model, moved, x, [{}, dict(intermediates=(0, 1), norm=True)])
  for i, (a, b) in enumerate(zip(inter['maps'], want['maps'])):
    assert_close_to_scale(a, b, rtol=RTOL, what=f'stage {i}')
  diff = assert_logits_match(logits, want_logits)
  print(f'Swin at 12 px, tables resampled in the call (bicubic) vs the transfer: max |logit diff| '
        f'{diff:.3g}')
  run(params, jnp.asarray(_images(12, 12, seed=9)))  # the same shape: no second trace
  assert traces == [(2, 12, 12, 3)]


def test_swin_timm_method_equals_timm_built_at_the_new_size(swin_32, timm):
  """With dynamic_resize_method='timm', the call equals timm building the model at 12 px and
  loading the 32-px weights through its checkpoint filter (`resize_rel_pos_bias_table`)."""
  torch, timm_ = timm
  from tests.test_swin_interop import _timm_model  # pylint: disable=import-outside-toplevel
  model, flat, _ = swin_32
  small = _timm_model(timm_, SWIN, (12, 12))
  small.load_state_dict(timm_.models.swin_transformer.checkpoint_filter_fn(
      _to_timm(flat, SWIN), small), strict=True)
  x = _images(12, 12, seed=9)
  with torch.no_grad():
    want = small(_nchw(x)).numpy()
  dynamic = model.clone(dynamic_img_size=True, dynamic_resize_method='timm')
  diff = assert_logits_match(_jit_apply(dynamic, params_lib.unflatten(flat), x), want)
  print(f'Swin at 12 px (timm method) vs timm built at 12 px: max |logit diff| {diff:.3g}')


# ---------- PVT v2 ----------

def test_pvt_intermediates_match_timm_at_the_build_size_and_others(timm):
  """No position table: the same parameters at 32x32 and 40x56 (not multiples of 32: maps of
  ceil(H / 4 / 2^s)) give timm's stage outputs; `norm` changes nothing (timm ignores it too)."""
  torch, timm_ = timm
  from tests.test_pvt import TINY, _timm_model  # pylint: disable=import-outside-toplevel
  from vit_jax.families.pvt_interop import from_timm  # pylint: disable=import-outside-toplevel
  from vit_jax.models import pvt  # pylint: disable=import-outside-toplevel
  tmodel = _timm_model(torch, timm_, TINY, seed=11)
  params = params_lib.unflatten(from_timm(tmodel.state_dict(), TINY))
  model = pvt.PyramidVisionTransformerV2(num_classes=7, **TINY)
  for (h, w), indices in (((32, 32), (0, 1, 2, 3)), ((40, 56), (-1, 1))):
    x = _images(h, w, seed=h)
    ours, normed, feats = _variants(model, params, x, [
        dict(intermediates=indices), dict(intermediates=indices, norm=True), dict(features=True)])
    take = backbone.take_indices(indices, 4)
    worst = _compare(ours, _timm_inter(tmodel, x, take, False), take, f'pvt {h}x{w}')
    print(f'PVT v2 {h}x{w} intermediates {indices}: max |diff| / scale vs timm {worst:.3g}')
    for a, b, s in zip(ours['maps'], normed['maps'], take):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, feats[s])
