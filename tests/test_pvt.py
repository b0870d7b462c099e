"""PVT v2: parameter counts, shapes, errors, equality with timm's pvt_v2, the family descriptor."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_logits_match
from tests import interop
from vit_jax.models import params as params_lib

from vit_jax.families.pvt import MODELS
from vit_jax.families.pvt_interop import fields_from_timm_name, from_timm, timm_model_args, to_timm
from vit_jax.models.pvt import PyramidVisionTransformerV2, adaptive_pool_matrix

TINY = MODELS['PVTv2-tiny']


def _init(model, h=32, w=32, seed=0):
  # Jitted: one compile instead of one per operation (eager, a pyramid model takes ~3x longer).
  return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, h, w, 3))))()['params']


def _apply(model, params, x, **kwargs):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, **kwargs))(params, x)


@pytest.mark.parametrize('name,expected', [
    ('PVTv2-b0', 3_666_760), ('PVTv2-b1', 14_009_000), ('PVTv2-b2', 25_362_856),
    ('PVTv2-b2_li', 22_553_512), ('PVTv2-b3', 45_238_696),
    ('pvt_v2_b4', 62_556_072), ('pvt_v2_b5', 81_956_008)])  # these two: timm names only
def test_parameter_counts_match_timm(name, expected):
  fields = MODELS[name] if name in MODELS else fields_from_timm_name(name)
  model = PyramidVisionTransformerV2(num_classes=1000, **fields)
  shapes = jax.eval_shape(lambda: _init(model, 224, 224))
  assert params_lib.count(shapes) == expected


@pytest.mark.parametrize('linear,h,w', [(False, 32, 32), (False, 40, 56), (True, 64, 96),
                                         (True, 40, 56)])
def test_shapes_at_square_non_square_and_non_multiple_sizes(linear, h, w):
  model = PyramidVisionTransformerV2(num_classes=5, **dict(TINY, linear=linear))
  params = _init(model, h, w)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, h, w, 3)), jnp.float32)
  logits = _apply(model, params, x)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  maps = _apply(model, params, x, features=True)
  # Padded convs give ceil(H / 2^(i+2)) per stage: H/4 ... H/32 exactly for multiples of 32.
  assert [m.shape for m in maps] == [
      (2, -(-h // s), -(-w // s), c) for s, c in zip((4, 8, 16, 32), TINY['embed_dims'])]
  pooled = _apply(PyramidVisionTransformerV2(num_classes=0, **dict(TINY, linear=linear)),
                  {k: v for k, v in params.items() if k != 'head'}, x)
  np.testing.assert_allclose(pooled, maps[-1].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_too_small_image_is_a_clear_error():
  model = PyramidVisionTransformerV2(num_classes=5, **TINY)
  with pytest.raises(ValueError, match=r'image size 16x40 .* stage 0.* ratio 8.* at least 29 px'):
    _init(model, 16, 40)
  # The linear variant pools to 7x7 and has no lower bound beyond one pixel.
  linear = PyramidVisionTransformerV2(num_classes=5, **dict(TINY, linear=True))
  assert linear.apply({'params': _init(linear, 16, 16)}, jnp.ones((1, 16, 16, 3))).shape == (1, 5)


def test_bad_field_lengths_and_act_are_errors():
  with pytest.raises(ValueError, match='num_heads has 3 entries but depths has 4'):
    _init(PyramidVisionTransformerV2(num_classes=5, **dict(TINY, num_heads=(1, 1, 2))))
  with pytest.raises(ValueError, match="act 'relu' is not one of"):
    _init(PyramidVisionTransformerV2(num_classes=5, act='relu', **TINY))


def test_adaptive_pool_matrix_matches_pytorch_bins():
  # 10 -> 7: bins [0,2) [1,3) [2,5) [4,6) [5,8) [7,9) [8,10) (PyTorch's floor/ceil bounds).
  m = adaptive_pool_matrix(10, 7)
  assert [tuple(np.flatnonzero(r)) for r in m] == [
      (0, 1), (1, 2), (2, 3, 4), (4, 5), (5, 6, 7), (7, 8), (8, 9)]
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
  torch = interop.require('torch')
  for size in (1, 2, 5, 7, 8, 13, 16):  # fewer inputs than bins repeat them; more average them
    x = np.random.RandomState(size).normal(size=(1, 3, size)).astype(np.float32)
    expected = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x), 7).numpy()
    np.testing.assert_allclose(x @ adaptive_pool_matrix(size, 7).T, expected, rtol=1e-6, atol=1e-6)


def test_stochastic_depth_differs_between_rngs_and_not_in_eval():
  model = PyramidVisionTransformerV2(num_classes=5, stochastic_depth=0.5,
                                     **dict(TINY, depths=(2, 2, 2, 2)))
  params = _init(model)
  x = jnp.asarray(np.random.RandomState(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  run = lambda seed: model.apply({'params': params}, x, train=True,
                                 rngs={'dropout': jax.random.PRNGKey(seed)})
  assert float(jnp.abs(run(0) - run(1)).max()) > 1e-4
  np.testing.assert_array_equal(run(3), run(3))
  evals = model.apply({'params': params}, x)
  np.testing.assert_array_equal(evals, model.apply({'params': params}, x))


def test_fields_from_timm_names():
  assert fields_from_timm_name('pvt_v2_b2_li.in1k')['linear'] is True
  assert fields_from_timm_name('pvt_v2_b5')['depths'] == (3, 6, 40, 3)
  assert fields_from_timm_name('pvt_v2_b0')['embed_dims'] == (32, 64, 160, 256)
  with pytest.raises(ValueError, match='not a PVT v2 architecture'):
    fields_from_timm_name('pvt_v3_b0')


# ---- timm equality ---------------------------------------------------------------------------

def _timm():
  from tests import interop  # pylint: disable=import-outside-toplevel
  return interop.require_timm()  # under scripts/test.sh a failure, not a skip


def _timm_model(torch, timm, fields, seed):
  torch.manual_seed(seed)
  model = timm.create_model('pvt_v2_b0', pretrained=False, num_classes=7,
                            **timm_model_args(fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Noise on top of the init so that LayerNorm affines, biases and the head are all exercised;
      # the scale keeps logits O(1) (checked below) so 1e-4 is a meaningful bound.
      p.add_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1))
  return model


@pytest.mark.parametrize('linear', [False, True])
def test_logits_and_features_match_timm(linear):
  torch, timm = _timm()
  fields = dict(TINY, linear=linear)
  tmodel = _timm_model(torch, timm, fields, seed=3 + linear)
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  flat = from_timm(tmodel.state_dict(), fields)
  model = PyramidVisionTransformerV2(num_classes=7, **fields)
  ref = params_lib.flatten_numpy(_init(model))
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in ref.items()}
  params = params_lib.unflatten(flat)
  for h, w in ((32, 32), (40, 72)):
    x = np.random.RandomState(h).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
    with torch.no_grad():
      tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      expected = tmodel(tx).numpy()
      expected_maps = [m.numpy().transpose(0, 2, 3, 1)
                       for m in tmodel.forward_intermediates(tx, intermediates_only=True)]
    got = np.asarray(model.apply({'params': params}, jnp.asarray(x)))
    diff = float(np.abs(got - expected).max())
    print(f'timm pvt_v2 linear={linear} {h}x{w}: max |logit diff| {diff:.3g}, '
          f'max |logit| {np.abs(expected).max():.3g}')
    assert_logits_match(got, expected)
    maps = model.apply({'params': params}, jnp.asarray(x), features=True)
    # Stage outputs at the scale of each map: float32 through up to 4 stages of convolutions and
    # attention, summed in another order by torch; measured <= 1.2e-6 of the scale.
    for i, (m, e) in enumerate(zip(maps, expected_maps)):
      assert_close_to_scale(m, e, rtol=1e-5, what=f'stage {i}')
  # And back: to_timm(from_timm(sd)) is the state dict bit for bit, and loads strictly into timm.
  back = to_timm(flat, fields)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_our_random_init_exports_to_timm_with_the_same_logits():
  torch, timm = _timm()
  fields = dict(TINY, linear=False)
  model = PyramidVisionTransformerV2(num_classes=7, **fields)
  params = _init(model, seed=5)
  params = jax.tree_util.tree_map(  # make every leaf matter, as above
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  tmodel = timm.create_model('pvt_v2_b0', pretrained=False, num_classes=7,
                             **timm_model_args(fields)).eval()
  state = to_timm(params_lib.flatten_numpy(params), fields)
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  x = np.random.RandomState(9).uniform(-1, 1, (2, 48, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = np.asarray(model.apply({'params': params}, jnp.asarray(x)))
  assert_logits_match(got, expected)


# ---- the family descriptor -------------------------------------------------------------------

def _registry():
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  return registry


def _jaxpr_macs(jaxpr) -> int:
  """MACs of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included."""
  macs = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      macs += int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
    elif eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape  # HWIO here: I is already in / groups
      macs += int(np.prod(out)) * int(np.prod(rhs[:-1]))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          macs += _jaxpr_macs(inner)
  return macs


def test_registry_builds_and_detects_pvt():
  registry = _registry()
  config = registry.get_model_config('PVTv2-b2_li')
  assert config.family == 'pvt' and config.linear is True
  model = registry.create_model(config, 1000)
  assert isinstance(model, PyramidVisionTransformerV2)
  for linear in (False, True):
    fields = dict(TINY, linear=linear, mlp_ratios=(2, 2, 4, 4))
    flat = params_lib.flatten_numpy(_init(PyramidVisionTransformerV2(num_classes=6, **fields), 32, 32))
    family = registry.detect(flat)
    assert family.name == 'pvt'
    arch = family.infer(flat, image_size=(32, 48))
    want = {k: fields[k] for k in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'linear')}
    assert {k: arch.model_config[k] for k in want} == want
    assert arch.num_classes == 6 and arch.channels == 3 and arch.image_size == (32, 48)
    if not linear:
      assert arch.model_config['sr_ratios'] == (8, 4, 2, 1)
    with pytest.raises(ValueError, match='depths'):
      family.infer(flat, model_config=dict(depths=(2, 2, 2, 2)))


def test_validate_names_the_problem():
  family = _registry().get_family('pvt')
  family.validate(MODELS['PVTv2-b0'], (224, 224))
  with pytest.raises(ValueError, match='image size 24x224 .* stage 0'):
    family.validate(MODELS['PVTv2-b0'], (24, 224))
  # Configs are held to exact pyramids (the module itself runs any size, as the tests above show).
  with pytest.raises(ValueError, match=r'image_size \(240, 224\) is not a multiple of 32'):
    family.validate(MODELS['PVTv2-b0'], (240, 224))
  with pytest.raises(ValueError, match='not a multiple of 64'):
    family.validate(dict(MODELS['PVTv2-b0'], sr_ratios=(8, 8, 2, 1)), (224, 224))
  family.validate(dict(MODELS['PVTv2-b0'], sr_ratios=(8, 8, 2, 1)), (256, 192))
  family.validate(dict(MODELS['PVTv2-b2_li'], sr_ratios=(8, 8, 2, 1)), (96, 32))  # pooled keys
  with pytest.raises(ValueError, match=r'embed_dims\[2\]=160 is not divisible by .*heads\[2\]=3'):
    family.validate(dict(MODELS['PVTv2-b0'], num_heads=(1, 2, 3, 8)), (224, 224))
  with pytest.raises(ValueError, match="model.act 'swish'"):
    family.validate(dict(MODELS['PVTv2-b0'], act='swish'), (224, 224))


def test_forward_macs_count_every_matmul_and_conv():
  family = _registry().get_family('pvt')
  fields = dict(TINY, mlp_ratios=(2, 2, 4, 4))
  model = PyramidVisionTransformerV2(num_classes=10, **fields)
  params = _init(model, 40, 72)
  forward = lambda p, x: model.apply({'params': p}, x)
  jaxpr = jax.make_jaxpr(forward)(params, jnp.zeros((1, 40, 72, 3)))
  assert family.forward_macs(fields, 10, (40, 72)) == _jaxpr_macs(jaxpr.jaxpr)
  # The paper's Table (GFLOPs, i.e. GMACs, at 224 px), rounded to 0.1; its b5 figure is 0.7% above
  # the matmul/conv count (11.72), so allow 1% beyond the rounding.
  paper = {'pvt_v2_b0': 0.6, 'pvt_v2_b1': 2.1, 'pvt_v2_b2': 4.0, 'pvt_v2_b2_li': 3.9,
           'pvt_v2_b3': 6.9, 'pvt_v2_b4': 10.1, 'pvt_v2_b5': 11.8}
  for name, gmacs in paper.items():
    ours = family.forward_macs(fields_from_timm_name(name), 1000, (224, 224)) / 1e9
    assert abs(ours - gmacs) <= 0.05 + 0.01 * gmacs, (name, ours)


def test_tensor_rules_cover_every_sharded_parameter_with_its_rank():
  family = _registry().get_family('pvt')
  for linear in (False, True):
    flat = params_lib.flatten_numpy(_init(PyramidVisionTransformerV2(num_classes=6, **dict(TINY, linear=linear))))
    for path, v in flat.items():
      rule = next((r for pattern, r in family.tensor_rules if re.search(pattern, path)), None)
      split = any(path.endswith(f'{m}/kernel') for m in ('q', 'kv', 'attn/proj', 'fc1', 'fc2',
                                                          'dwconv'))
      if split:
        assert rule is not None and len(rule) == v.ndim and 'tensor' in rule, path
        # The split axis is the heads or the hidden units.
        axis = rule.index('tensor')
        assert v.shape[axis] in (TINY['num_heads'][int(path[7])],
                                 2 * TINY['embed_dims'][int(path[7])]), path
      elif rule is not None:
        assert rule == () or len(rule) == v.ndim, path


def test_family_timm_hooks_round_trip_through_a_timm_directory(tmp_path):
  torch, timm = _timm()
  from vit_jax.formats.timm import read_timm, write_timm  # pylint: disable=import-outside-toplevel
  registry = _registry()
  family = registry.get_family('pvt')
  pvt_interop = registry.interop(family)
  fields = dict(TINY, linear=True)
  model = PyramidVisionTransformerV2(num_classes=4, **fields)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), _init(model))
  flat = params_lib.flatten_numpy(params)
  arch = family.infer(flat, model_config=dict(fields, name='PVTv2-tiny'), image_size=(32, 40))
  state, config = pvt_interop.to_timm(flat, arch)
  assert registry.interop_for_timm(config['architecture'], state.keys()) is pvt_interop
  assert registry.interop_for_timm('', state.keys()).family is family
  tmodel = timm.create_model(config['architecture'], pretrained=False,
                             **config['model_args']).eval()
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  x = np.random.RandomState(2).uniform(-1, 1, (2, 32, 40, 3)).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert_logits_match(model.apply({'params': params}, x), expected)

  write_timm(tmp_path, flat, arch, class_names=list('abcd'))
  back, arch2, info = read_timm(tmp_path)
  assert sorted(back) == sorted(flat) and info['class_names'] == list('abcd')
  for k, v in flat.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert arch2.family == 'pvt' and arch2.model_config['linear'] is True
  assert arch2.name == 'PVTv2-tiny' and arch2.num_classes == 4 and arch2.image_size == (32, 40)
  # A bare state dict needs the head counts (timm fuses them); the input norm is timm's default.
  _, arch3, _ = pvt_interop.from_timm(state, {'model_args': {'num_heads': fields['num_heads']}})
  assert arch3.model_config['embed_dims'] == fields['embed_dims'] and arch3.mean[0] == 0.485
  with pytest.raises(ValueError, match='head count is not in the weights'):
    pvt_interop.from_timm(state, {})
  with pytest.raises(ValueError, match='not part of a PVT v2'):
    pvt_interop.from_timm({**state, 'blocks.0.attn.qkv.weight': np.zeros((3, 3))},
                          {'model_args': {'num_heads': fields['num_heads']}})
  with pytest.raises(ValueError, match='exact GELU'):
    pvt_interop.to_timm(flat, type(arch)(dict(arch.model_config, act='gelu_tanh'), 4, (32, 40),
                                         family='pvt'))
