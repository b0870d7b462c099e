"""Swin Transformer: registered sizes, windows and masks, bias resizing and the family descriptor;
equality with timm's Swin is tested in test_swin_interop.py."""
from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import params as params_lib

from vit_jax.families import swin as swin_family
from vit_jax.families.resample import resize_relative_position_bias
from vit_jax.families.swin import MODELS, infer_fields
from vit_jax.families.swin_interop import fields_from_timm_name
from vit_jax.models.attention import dot_product_attention
from vit_jax.models.swin import (MASK_VALUE, SwinTransformer, relative_position_index,
                                 shifted_window_mask, stage_windows, window_partition)

TINY = MODELS['Swin-testing']


def _init(model, h=32, w=32, seed=0):
  # Jitted: one compile instead of one per operation (eager, a pyramid model takes ~3x longer).
  return jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, h, w, 3))))()['params']


def _apply(model, params, x, **kwargs):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, **kwargs))(params, x)


def _images(h=32, w=32, seed=0):
  return np.random.RandomState(seed).normal(size=(2, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize('name,size,expected', [
    ('Swin-T', 224, 28_288_354), ('Swin-S', 224, 49_606_258), ('Swin-B', 224, 87_768_224),
    ('Swin-L', 224, 196_532_476), ('Swin-B_384', 384, 87_903_584)])
def test_parameter_counts_match_timm(name, size, expected):
  model = SwinTransformer(num_classes=1000, **MODELS[name])
  assert params_lib.count(jax.eval_shape(lambda: _init(model, size, size))) == expected


@pytest.mark.parametrize('fields,h,w', [
    (TINY, 32, 32),
    (dict(TINY, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)), 32, 48),
])
def test_logits_and_feature_shapes(fields, h, w):
  model = SwinTransformer(num_classes=5, **fields)
  params = _init(model, h, w)
  x = jnp.asarray(_images(h, w))
  logits = _apply(model, params, x)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  maps = _apply(model, params, x, features=True)
  p, d = fields['patch_size'], fields['embed_dim']
  assert [m.shape for m in maps] == [(2, h // p // 2 ** s, w // p // 2 ** s, d * 2 ** s)
                                     for s in range(len(fields['depths']))]
  # Headless: the mean over the last map after the final LayerNorm.
  pooled = _apply(SwinTransformer(num_classes=None, **fields),
                  {k: v for k, v in params.items() if k != 'head'}, x)
  last = maps[-1]
  mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  normed = (last - mu) / jnp.sqrt(var + 1e-5) * params['norm']['scale'] + params['norm']['bias']
  np.testing.assert_allclose(pooled, normed.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_head_zeroinit_gives_a_zero_head_kernel():
  params = _init(SwinTransformer(num_classes=5, head_zeroinit=True, **TINY))
  assert not np.any(np.asarray(params['head']['kernel']))
  params = _init(SwinTransformer(num_classes=5, **TINY))
  assert np.any(np.asarray(params['head']['kernel']))


def test_sizes_that_cannot_work_are_clear_errors():
  model = SwinTransformer(num_classes=5, **TINY)  # patch 2, 2 stages: multiples of 4 px.
  with pytest.raises(ValueError, match=r'image size 30x32 .* multiples of patch_size \* 2\^1 = 4'):
    _init(model, 30, 32)
  four = SwinTransformer(num_classes=5, **MODELS['Swin-T'])
  with pytest.raises(ValueError, match=r'multiples of patch_size \* 2\^3 = 32 \(e.g. 224x224\)'):
    jax.eval_shape(lambda: _init(four, 230, 230))
  with pytest.raises(ValueError, match='of equal length'):
    _init(SwinTransformer(num_classes=5, **dict(TINY, num_heads=(1, 2, 4))))
  with pytest.raises(ValueError, match='stage 1 width 32 is not divisible by its 3 heads'):
    _init(SwinTransformer(num_classes=5, **dict(TINY, num_heads=(1, 3))))
  with pytest.raises(ValueError, match="act 'relu' is not one of"):
    _init(SwinTransformer(num_classes=5, act='relu', **TINY))


def test_windows_shrink_to_small_maps_and_stop_shifting():
  assert stage_windows((56, 56), 7) == ((7, 7), (3, 3))
  assert stage_windows((7, 7), 7) == ((7, 7), (0, 0))      # Swin-T's last stage at 224
  assert stage_windows((5, 12), 7) == ((5, 7), (0, 3))     # per axis
  assert stage_windows((12, 12), 12) == ((12, 12), (0, 0))  # Swin-B_384's last stage


def test_relative_position_index_offsets():
  idx = relative_position_index((3, 5))
  assert idx.shape == (15, 15) and idx.min() == 0 and idx.max() == 5 * 9 - 1
  # Query (0, 0) and key (2, 4): offset (-2, -4) -> row (-2 + 2) * 9 + (-4 + 4) = 0; reversed: last.
  assert idx[0, 14] == 0 and idx[14, 0] == 44
  assert np.all(np.diag(idx) == 2 * 9 + 4)  # zero offset: the centre row


def _wrapped(n, window, shift):
  """Per position of a shifted axis: whether its token wrapped around from the other end."""
  hp = -(-n // window) * window
  return (np.arange(hp) + shift) >= hp


@pytest.mark.parametrize('grid,window', [((8, 8), 4), ((12, 8), 4), ((10, 10), 4)])
def test_shifted_window_mask_keeps_wrapped_regions_apart(grid, window):
  win, shift = stage_windows(grid, window)
  mask = shifted_window_mask(grid, win, shift)
  # Independently: tokens may attend iff both or neither wrapped around, along each axis.
  wy, wx = _wrapped(grid[0], win[0], shift[0]), _wrapped(grid[1], win[1], shift[1])
  region = (wy[:, None] * 2 + wx[None, :]).astype(np.int32)
  r = window_partition(region[None, :, :, None], win).reshape(-1, win[0] * win[1])
  want = np.where(r[:, :, None] == r[:, None, :], 0.0, MASK_VALUE)
  np.testing.assert_array_equal(mask, want)
  assert mask.min() == MASK_VALUE and mask[0].max() == 0.0  # the first window is whole
  assert shifted_window_mask(grid, win, (0, 0)) is None

  # Through the attention function: weights across regions are exactly 0, within they sum to 1.
  n = win[0] * win[1]
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.normal(size=(len(mask), n, 2, 8)), jnp.float32) for _ in range(3))
  _, weights = dot_product_attention(q, k, v, bias=jnp.asarray(mask)[:, None], return_weights=True)
  weights = np.asarray(weights)
  assert np.all(weights[np.broadcast_to(mask[:, None] != 0, weights.shape)] == 0.0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_attention_bias_is_added_before_softmax_on_every_path():
  rng = np.random.RandomState(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(1, 3, 6, 6)), jnp.float32)
  logits = jnp.einsum('bthk,bshk->bhts', q, k) / 2.0 + bias
  want = jnp.einsum('bhts,bshk->bthk', jax.nn.softmax(logits, -1), v)
  for impl in (None, 'xla'):
    out, _ = dot_product_attention(q, k, v, bias=bias, implementation=impl)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_depends_on_the_rng_only_in_training():
  model = SwinTransformer(num_classes=5, stochastic_depth=0.5, **TINY)
  params = _init(model)
  x = jnp.asarray(_images())
  run = lambda seed: np.asarray(model.apply({'params': params}, x, train=True,
                                            rngs={'dropout': jax.random.PRNGKey(seed)}))
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(run(1), run(1))
  plain = SwinTransformer(num_classes=5, **TINY)
  np.testing.assert_array_equal(model.apply({'params': params}, x),
                                plain.apply({'params': params}, x))


def test_resize_relative_position_bias():
  rng = np.random.RandomState(0)
  table = rng.normal(size=(13 * 13, 3)).astype(np.float32)
  assert resize_relative_position_bias(table, 7, 7) is table
  # A smooth function of the offset stays that function of the (rescaled) offset.
  def smooth(m, scale):
    d = (np.arange(2 * m - 1) - (m - 1)) * scale
    dy, dx = np.meshgrid(d, d, indexing='ij')
    values = [np.cos(dy / 6) * np.sin(dx / 9), dy / 12 + dx / 15, np.exp(-(dy ** 2 + dx ** 2) / 50)]
    return np.stack(values, -1).reshape(-1, 3).astype(np.float32)
  src = smooth(7, 1.0)
  out = resize_relative_position_bias(src, 7, 12)
  assert out.shape == (23 * 23, 3) and out.dtype == np.float32
  want = smooth(12, 13 / 23)  # half-pixel centres: 23 samples span the 13 old ones
  inner = np.zeros((23, 23), bool)
  inner[3:-3, 3:-3] = True  # away from the edges, where the image-style resize clamps
  err = np.abs(out - want).reshape(23, 23, 3)[inner]
  assert err.max() < 2e-3, err.max()
  const = np.full((13 * 13, 2), 0.7, np.float32)
  np.testing.assert_allclose(resize_relative_position_bias(const, 7, (4, 6), 'bilinear'), 0.7,
                             rtol=1e-6)
  assert resize_relative_position_bias(const, 7, (4, 6)).shape == (7 * 11, 2)
  with pytest.raises(ValueError, match=r'window \(6, 6\) must be \[121, heads\]'):
    resize_relative_position_bias(table, 6, 7)


def test_fields_from_timm_names_and_inference():
  assert fields_from_timm_name('swin_base_patch4_window12_384.ms_in22k_ft_in1k') == dict(
      MODELS['Swin-B_384'], act='gelu')
  assert fields_from_timm_name('swin_tiny_patch4_window7_224') == dict(MODELS['Swin-T'], act='gelu')
  with pytest.raises(ValueError, match='not a timm Swin name'):
    fields_from_timm_name('swinv2_tiny_window8_256')
  shapes = jax.eval_shape(lambda: _init(SwinTransformer(num_classes=5, **TINY)))
  fields, num_classes, channels = infer_fields(
      {'/'.join(k): np.zeros(v.shape, np.float32)
       for k, v in flax.traverse_util.flatten_dict(shapes).items()})
  assert fields == dict(TINY, depths=tuple(TINY['depths']), num_heads=tuple(TINY['num_heads']),
                        mlp_ratio=4.0)
  assert (num_classes, channels) == (5, 3)


# ---------- the family descriptor ----------

def _shapes(fields, size, num_classes=5) -> dict:
  """Flat ShapeDtypeStructs of a model (shapes are all that `infer` reads)."""
  tree = jax.eval_shape(lambda: _init(SwinTransformer(num_classes=num_classes, **fields), *size))
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_registry_builds_swin_and_validates_sizes():
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  family = registry.family_of('Swin-T')
  assert family is swin_family.FAMILY and registry.names('swin') == sorted(MODELS)
  model = registry.create_model(registry.get_model_config('Swin-B_384'), 10)
  assert isinstance(model, SwinTransformer) and model.window_size == 12
  family.validate(MODELS['Swin-T'], (224, 224))
  with pytest.raises(ValueError, match=r'multiples of patch_size \* 2\^3 = 32'):
    family.validate(MODELS['Swin-T'], (200, 224))
  assert family.summary_rows(MODELS['Swin-T'], (224, 224)) == [
      'stage 0: 56x56 tokens, width 96, 2 blocks of 3 heads, windows 7x7 shifted by 3x3',
      'stage 1: 28x28 tokens, width 192, 2 blocks of 6 heads, windows 7x7 shifted by 3x3',
      'stage 2: 14x14 tokens, width 384, 6 blocks of 12 heads, windows 7x7 shifted by 3x3',
      'stage 3: 7x7 tokens, width 768, 2 blocks of 24 heads, windows 7x7 shifted by 0x0']


@pytest.mark.parametrize('name,size,gmacs', [
    ('Swin-T', 224, 4.5), ('Swin-S', 224, 8.7), ('Swin-B', 224, 15.4), ('Swin-L', 224, 34.5),
    ('Swin-B_384', 384, 47.0)])
def test_forward_macs_match_the_paper(name, size, gmacs):
  # Table 1 of the paper ("FLOPs" there are multiply-accumulates, fvcore's count).
  macs = swin_family.FAMILY.forward_macs(MODELS[name], 1000, (size, size))
  assert abs(macs / 1e9 - gmacs) < 0.1, macs


def test_tensor_rules_match_every_block_projection():
  shapes = _shapes(TINY, (32, 32))
  matched = {}
  for pattern, spec in swin_family.TENSOR_RULES:
    hits = [k for k in shapes if re.search(pattern, k)]
    assert hits, pattern
    assert all(len(spec) in (0, len(shapes[k].shape)) for k in hits), pattern
    matched.update({k: spec for k in hits if k not in matched})
  for key in shapes:
    if re.search(r'/(qkv|proj|fc1|fc2)/kernel$|relative_position_bias_table$', key):
      assert 'tensor' in matched[key], key


def test_infer_reads_the_architecture_back():
  family = swin_family.FAMILY
  arch = family.infer(_shapes(TINY, (32, 32)))
  assert arch.image_size == (16, 16)  # the last stage is one 4x4 window at patch 2
  assert arch.model_config == dict(TINY, mlp_ratio=4.0) and arch.num_classes == 5
  assert family.infer(_shapes(TINY, (32, 48)), image_size=(32, 48)).image_size == (32, 48)
  # At 8 px the last stage is 2x2, so its tables shrank: the size is read from them.
  assert family.infer(_shapes(TINY, (8, 8))).image_size == (8, 8)
  with pytest.raises(ValueError, match='stage 1: the bias tables hold 49 offsets'):
    family.infer(_shapes(TINY, (32, 32)), image_size=(8, 8))
  with pytest.raises(ValueError, match=r'embed_dim=16 \(the config has 32\)'):
    family.infer(_shapes(TINY, (32, 32)), model_config={'embed_dim': 32})
  assert family.matches(_shapes(TINY, (32, 32)))
  big = family.infer(_shapes(MODELS['Swin-B_384'], (384, 384), 1000))
  assert big.image_size == (384, 384) and big.model_config['window_size'] == 12


@pytest.mark.parametrize('window,size', [(8, 64), (4, 8)])
def test_pretrained_tables_follow_the_new_window(tmp_path, window, size):
  from vit_jax.checkpoints import load_pretrained  # pylint: disable=import-outside-toplevel
  from vit_jax.formats.timm import write_timm  # pylint: disable=import-outside-toplevel
  src = params_lib.flatten_numpy(_init(SwinTransformer(num_classes=5, **TINY)))
  write_timm(tmp_path, src, swin_family.FAMILY.infer(src, image_size=32))
  target = SwinTransformer(num_classes=3, **dict(TINY, window_size=window))
  params, report = load_pretrained(tmp_path, _init(target, size, size), model=target,
                                   image_size=(size, size), posemb_resize='bicubic', log=None)
  got = params_lib.flatten_numpy(params)
  windows = swin_family.stage_tables(dict(TINY, window_size=window), size)
  assert windows == ([(8, 8), (8, 8)] if window == 8 else [(4, 4), (2, 2)])
  for key, value in src.items():
    if key.startswith('head/'):
      continue
    if key.endswith('relative_position_bias_table'):
      stage = int(re.match(r'stage_(\d+)/', key).group(1))
      want = resize_relative_position_bias(value, 4, windows[stage], 'bicubic')
      np.testing.assert_allclose(got[key], want, rtol=1e-6)
    else:
      np.testing.assert_array_equal(got[key], value)
  assert len(report.reshaped) == (4 if window == 8 else 2)
  assert got['head/kernel'].shape == (32, 3)
  assert target.apply({'params': params}, jnp.zeros((1, size, size, 3))).shape == (1, 3)
