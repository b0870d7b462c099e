"""Hybrid ResNet + ViT: registered sizes, the ResNet's numerics, and equality with timm 1.0.31."""
from __future__ import annotations

from functools import partial

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import params as params_lib

from tests.numerics import assert_close_to_scale, assert_logits_match
from vit_jax.families import hybrid as fam
from vit_jax.families import hybrid_interop
from vit_jax.families import registry
from vit_jax.models import resnet
from vit_jax.models.hybrid import HybridVisionTransformer

TINY = dict(fam.MODELS['R+ViT-testing'])


def _images(h=32, w=32, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)


def _perturbed_params(model, h=32, w=32, seed=0) -> dict[str, np.ndarray]:
  """Our initialisation with every parameter randomised (gn3 and the head start at zero)."""
  flat = params_lib.flatten_numpy(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, h, w, 3)))['params'])
  rng = np.random.RandomState(seed)
  out = {}
  for k, v in flat.items():
    if k.endswith('/scale'):
      out[k] = (1 + 0.2 * rng.randn(*v.shape)).astype(np.float32)
    elif v.ndim == 1 or k.endswith('/bias'):
      out[k] = (0.2 * rng.randn(*v.shape)).astype(np.float32)
    else:
      out[k] = (0.3 * rng.randn(*v.shape)).astype(np.float32)
  return out


# ---------- sizes and shapes ----------

@pytest.mark.parametrize('name,expected,patch', [
    ('R+ViT-Ti_16', 6_337_704, 32), ('R26+ViT-S_32', 36_431_912, 32),
    ('R50+ViT-B_16', 98_659_112, 16), ('R50+ViT-L_32', 328_994_856, 32)])
def test_parameter_counts_match_timm(name, expected, patch):
  model = registry.create_model(registry.get_model_config(name), 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  assert params_lib.count(shapes) == expected
  fields = registry.get_model_config(name)
  assert fam.FAMILY.patch_hw(fields) == (patch, patch) == model.effective_patch_hw
  assert fam.FAMILY.grid(fields, (224, 224)) == (224 // patch,) * 2


def test_forward_shapes_features_and_bad_sizes():
  model = HybridVisionTransformer(num_classes=5, **TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  assert set(params) >= {'conv_root', 'gn_root', 'block1', 'block2', 'embedding', 'cls',
                         'Transformer', 'head'}
  assert params['block2']['unit1']['conv2']['kernel'].shape == (3, 3, 64, 64)
  assert 'conv_proj' in params['block1']['unit1'] and 'conv_proj' not in params['block2'].get(
      'unit2', {})
  x = jnp.asarray(_images())
  apply = jax.jit(model.apply, static_argnames='features')
  assert apply({'params': params}, x).shape == (2, 5)
  (fmap,) = apply({'params': params}, x, features=True)
  assert fmap.shape == (2, 4, 4, TINY['hidden_size'])  # /8: root /4, second stage /2
  resnet_params = {k: params[k] for k in ('conv_root', 'gn_root', 'block1', 'block2')}
  maps = jax.eval_shape(partial(resnet.ResNet(32, (1, 1)).apply, features=True),
                        {'params': resnet_params}, x)
  assert [m.shape for m in maps] == [(2, 8, 8, 32), (2, 8, 8, 128), (2, 4, 4, 256)]
  init = lambda fields, size: jax.eval_shape(
      HybridVisionTransformer(num_classes=5, **fields).init, jax.random.PRNGKey(0),
      jnp.zeros((1, size, size, 3)))
  with pytest.raises(ValueError, match='multiple of 16x16'):
    init(dict(TINY, patch_size=2), 40)  # a 5x5 map
  with pytest.raises(ValueError, match='multiple of 32'):
    init(dict(TINY, resnet_width=48), 32)
  with pytest.raises(ValueError, match='resnet_width'):
    fam.FAMILY.validate(dict(TINY, resnet_width=16), (32, 32))


def test_weight_standardisation_matches_numpy():
  rng = np.random.RandomState(1)
  # A small spread, as trained kernels have, makes the eps visible: timm's sqrt(var + 1e-8) and
  # Google's std + 1e-5 then differ by ~1%.
  kernel = (1e-3 * rng.randn(3, 3, 4, 6) + 2e-4).astype(np.float32)
  w = kernel.astype(np.float64)
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)  # biased, as timm's batch_norm
  expected = (w - mean) / np.sqrt(var + 1e-8)
  assert_close_to_scale(resnet.standardize_weight(jnp.asarray(kernel)), expected, rtol=1e-5)
  google = (w - mean) / (np.sqrt(var) + 1e-5)
  assert np.abs(google - expected).max() > 1e-3 * np.abs(expected).max()
  # The conv uses the standardised kernel, padded TF-style 'SAME' (an 8x10 input at stride 2 takes
  # its one padding row and column at the bottom and right, as timm's pad_same).
  x = rng.randn(1, 8, 10, 4).astype(np.float32)
  conv = resnet.StdConv(6, (3, 3), strides=(2, 2), padding='SAME', use_bias=False)
  y = conv.apply({'params': {'kernel': jnp.asarray(kernel)}}, x)
  ref = jax.lax.conv_general_dilated(x, expected.astype(np.float32), (2, 2), ((0, 1), (0, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert y.shape == (1, 4, 5, 6) and np.abs(np.asarray(ref)).max() > 1.0
  assert_close_to_scale(y, ref, rtol=1e-5)


def test_family_reads_its_trees_and_counts_macs():
  family = registry.get_family('hybrid')
  model = family.create(TINY, 5)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 48, 3)))['params']
  flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  assert registry.detect(flat) is family
  assert not registry.get_family('vit').matches(flat)
  arch = family.infer(flat, image_size=(32, 48))
  assert arch.family == 'hybrid' and arch.num_classes == 5 and arch.channels == 3
  assert arch.model_config['resnet_layers'] == (1, 1) and arch.model_config['resnet_width'] == 32
  with pytest.raises(ValueError, match='resnet_layers'):
    family.infer(flat, model_config=dict(TINY, resnet_layers=(1, 2)), image_size=(32, 48))
  # Analytic MACs equal the convolutions and matmuls XLA is given (batch 1).
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x))(
      shapes, jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32))
  assert family.forward_macs(TINY, 5, (32, 48)) == _jaxpr_macs(jaxpr.jaxpr)
  # The ResNet is replicated under tensor parallelism.
  import re  # pylint: disable=import-outside-toplevel
  for key in flat:
    if key.startswith(('conv_root', 'gn_root', 'block')):
      assert any(re.search(p, key) and spec == () for p, spec in family.tensor_rules), key


def _jaxpr_macs(jaxpr) -> int:
  """Multiply-accumulates of every convolution and dot_general in a jaxpr (and its sub-jaxprs)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape  # HWIO here
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(rhs[:-1])) // (
          eqn.params['feature_group_count'])
    elif name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += _jaxpr_macs(inner)
  return total


# ---------- timm ----------

from tests import interop  # noqa: E402

torch, timm = interop.require_timm()  # under scripts/test.sh a failure, not a skip

from timm.layers import StdConv2dSame  # noqa: E402
from timm.models import vision_transformer_hybrid as timm_hybrid  # noqa: E402
from timm.models.resnetv2 import ResNetV2  # noqa: E402

# (our fields, image size, how timm builds the backbone): timm's own `_resnetv2` (width 64) for
# stages and root-only, and a width-32 ResNetV2 as `_resnetv2` configures it, at an odd map size.
_VIT = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, classifier='token',
            posemb='learned', representation_size=None, act='gelu')
CASES = {
    'r50-like': (dict(_VIT, patch_size=1, resnet_layers=(1, 2), resnet_width=64), (32, 32)),
    'root-only': (dict(_VIT, patch_size=2, resnet_layers=(), resnet_width=64), (32, 48)),
    'width32-gap-odd': (dict(_VIT, patch_size=1, resnet_layers=(1, 1), resnet_width=32,
                             classifier='gap', act='gelu_tanh'), (36, 28)),
}


def _timm_model(fields, image_size, num_classes=5, seed=0):
  torch.manual_seed(seed)
  width, layers = fields['resnet_width'], fields['resnet_layers']
  if width == 64:
    backbone = timm_hybrid._resnetv2(layers)  # pylint: disable=protected-access
  else:
    backbone = ResNetV2(layers=layers, stem_chs=width, channels=tuple(4 * width * 2 ** i
                                                                      for i in range(4)),
                        num_classes=0, global_pool='', preact=False, stem_type='same',
                        conv_layer=partial(StdConv2dSame, eps=1e-8))
  gap = fields['classifier'] == 'gap'
  model = timm_hybrid._create_vision_transformer_hybrid(  # pylint: disable=protected-access
      'vit_base_r50_s16_224', backbone=backbone, pretrained=False, img_size=list(image_size),
      patch_size=fields['patch_size'], embed_dim=fields['hidden_size'],
      depth=fields['num_layers'], num_heads=fields['num_heads'],
      mlp_ratio=fields['mlp_dim'] / fields['hidden_size'], num_classes=num_classes,
      global_pool='avg' if gap else 'token', class_token=not gap, fc_norm=False,
      act_layer='gelu_tanh' if fields['act'] == 'gelu_tanh' else 'gelu').eval()
  with torch.no_grad():  # Random weights of O(1) logits (timm zero-inits nothing that matters).
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.normal_(0, 0.3)
      else:
        p.normal_(1.0 if 'norm' in name and name.endswith('weight') else 0.0, 0.2)
  return model


def _run(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _ours(fields, flat, images, num_classes=5) -> np.ndarray:
  model = HybridVisionTransformer(num_classes=num_classes, **fields)
  return np.asarray(model.apply({'params': params_lib.unflatten(flat)}, jnp.asarray(images)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_timm_weights_give_timm_logits_and_round_trip(case):
  fields, size = CASES[case]
  model = _timm_model(fields, size)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  flat = hybrid_interop.from_timm(sd, fields)
  assert {k: v.shape for k, v in flat.items()} == _init_shapes(fields, size)
  images = _images(*size)
  theirs, ours = _run(model, images), _ours(fields, flat, images)
  diff = assert_logits_match(ours, theirs, what=case)
  print(f'{case}: max |logit diff| vs timm {diff:.3g} (logits up to {np.abs(theirs).max():.3g})')
  back = hybrid_interop.to_timm(flat, fields)
  assert sorted(back) == sorted(sd)
  assert all(back[k].dtype == sd[k].dtype and back[k].tobytes() == sd[k].tobytes() for k in sd)


@pytest.mark.parametrize('case', ['r50-like', 'width32-gap-odd'])
def test_resnet_matches_timm_backbone_on_faint_images(case):
  """Faint images keep every GroupNorm's variance near its eps, so the eps (1e-5) must match too."""
  fields, size = CASES[case]
  model = _timm_model(fields, size)
  flat = hybrid_interop.from_timm({k: v.numpy() for k, v in model.state_dict().items()}, fields)
  images = 1e-3 * _images(*size, seed=5)
  with torch.no_grad():
    theirs = model.patch_embed.backbone(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  net = resnet.ResNet(fields['resnet_width'], fields['resnet_layers'])
  ours = net.apply({'params': params_lib.unflatten(fam.split_resnet(flat)[0])}, jnp.asarray(images))
  assert_close_to_scale(ours, theirs.numpy().transpose(0, 2, 3, 1), rtol=1e-4)


def _init_shapes(fields, size, num_classes=5) -> dict[str, tuple]:
  model = HybridVisionTransformer(num_classes=num_classes, **fields)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3))))
  return {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes['params']).items()}


@pytest.mark.parametrize('case', ['r50-like', 'root-only'])
def test_our_npz_loads_with_timms_npz_loader(tmp_path, case):
  """Our flat dict is Google's hybrid .npz layout: timm's `load_pretrained` reads it as it is."""
  fields, size = CASES[case]
  flat = _perturbed_params(HybridVisionTransformer(num_classes=5, **fields), *size, seed=3)
  np.savez(tmp_path / 'hybrid.npz', **flat)
  model = _timm_model(fields, size, seed=7)
  model.load_pretrained(str(tmp_path / 'hybrid.npz'))
  images = _images(*size, seed=1)
  theirs, ours = _run(model, images), _ours(fields, flat, images)
  assert_logits_match(ours, theirs, what=case)


def test_family_timm_export_rebuilds_in_timm_and_reads_back(tmp_path):
  """`--to timm` of a root-only hybrid: timm's registry entry + model_args rebuild the network."""
  from vit_jax.formats import timm as timm_format  # pylint: disable=import-outside-toplevel
  fields, size = CASES['root-only']
  family = registry.get_family('hybrid')
  flat = _perturbed_params(family.create(fields, 5), *size, seed=4)
  arch = family.infer(flat, model_config=fields, image_size=size)
  timm_format.write_timm(tmp_path, flat, arch)
  model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
  images = _images(*size, seed=2)
  assert_logits_match(_ours(fields, flat, images), _run(model, images))
  back, arch2, _ = timm_format.read_timm(tmp_path)
  assert arch2.family == 'hybrid' and arch2.image_size == size
  assert {k: arch2.model_config[k] for k in fields} == fields
  assert sorted(back) == sorted(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
  # A ResNet timm has no registry entry for cannot be exported by name.
  tiny = family.infer(_perturbed_params(family.create(TINY, 5)), model_config=TINY)
  with pytest.raises(ValueError, match='registered ResNets'):
    hybrid_interop.INTEROP.to_timm(_perturbed_params(family.create(TINY, 5)), tiny)


def test_fields_from_timm_names():
  fields_from_timm_name = hybrid_interop.fields_from_timm_name
  assert fields_from_timm_name('vit_base_r50_s16_384.orig_in21k_ft_in1k') == dict(
      fam.MODELS['R50+ViT-B_16'], act='gelu')
  assert fields_from_timm_name('vit_tiny_r_s16_p8_224') == dict(
      fam.MODELS['R+ViT-Ti_16'], act='gelu')
  assert fields_from_timm_name('vit_small_r26_s32_224')['resnet_layers'] == (2, 2, 2, 2)
  assert fields_from_timm_name('vit_large_r50_s32_384')['resnet_layers'] == (3, 4, 6, 3)
  with pytest.raises(ValueError, match='hybrid'):
    fields_from_timm_name('vit_small_resnet26d_224')
  keys = {'patch_embed.backbone.stem.conv.weight', 'patch_embed.proj.weight'}
  assert registry.interop_for_timm('vit_base_r50_s16_224', keys) is hybrid_interop.INTEROP
  assert registry.interop_for_timm('', keys).name == 'hybrid'
  assert registry.interop_for_timm('', {'patch_embed.backbone.conv.weight',
                                        'patch_embed.proj.weight'}).name == 'hybrid'
  vit_keys = {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'}
  assert registry.interop_for_timm('vit_base_patch16_224', vit_keys).name == 'vit'
