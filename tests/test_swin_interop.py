"""Swin <-> timm (`vit_jax.families.swin_interop`): logits and stage outputs against timm's Swin,
bitwise key round trips, timm's bias-table resizing and a timm directory export (CPU torch; timm
through vit_jax/convert/torchvision_stub)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_logits_match
from tests.test_swin import TINY, _images, _init
from vit_jax.families import swin as swin_family
from vit_jax.families import swin_interop
from vit_jax.families.resample import resize_relative_position_bias
from vit_jax.families.swin_interop import from_timm, to_timm
from vit_jax.models import params as params_lib
from vit_jax.models.swin import SwinTransformer, relative_position_index
from vit_jax.shapes import hw


@pytest.fixture(scope='module')
def timm():
  from tests import interop  # pylint: disable=import-outside-toplevel
  return interop.require_timm()[1]  # under scripts/test.sh a failure, not a skip


def _timm_model(timm, fields, image_size, num_classes=5):
  import torch  # pylint: disable=import-outside-toplevel
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                            **swin_interop.timm_model_args(fields, num_classes, image_size)).eval()
  # Random weights at init scale give logits ~0.01; noise makes them O(1) for a 1e-4 bound.
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.2)
  return model


@pytest.mark.parametrize('fields,h,w', [
    (TINY, 32, 32),
    # Windows of 5 on 12x12 and 6x6 maps pad (after the shift); the 3x3 last stage shrinks them.
    (dict(TINY, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=5), 24, 24),
    (dict(TINY, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=3), 32, 48),
])
def test_logits_match_timm_and_keys_round_trip(timm, fields, h, w):
  import torch  # pylint: disable=import-outside-toplevel
  model = _timm_model(timm, fields, (h, w))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  flat = from_timm(state, fields)
  back = to_timm(flat, fields)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

  ours = SwinTransformer(num_classes=5, **fields)
  params = params_lib.unflatten(flat)
  shapes = jax.eval_shape(lambda: _init(ours, h, w))
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  x = _images(h, w, seed=4)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = np.asarray(ours.apply({'params': params}, jnp.asarray(x)))
  diff = assert_logits_match(got, want)
  print(f'Swin {h}x{w} window {fields["window_size"]}: max |logit diff| vs timm {diff:.3g}')
  # The stage outputs are timm's forward_intermediates (NCHW there).
  with torch.no_grad():
    inter = model.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                        intermediates_only=True)
  maps = ours.apply({'params': params}, jnp.asarray(x), features=True)
  # Stage outputs at the scale of each map: float32 through up to 4 stages, summed in another
  # order by torch; measured <= 1.2e-6 of the scale.
  for i, (a, b) in enumerate(zip(maps, inter)):
    assert_close_to_scale(a, b.numpy().transpose(0, 2, 3, 1), rtol=1e-5, what=f'stage {i}')


def test_relative_position_index_matches_timm(timm):
  reference = timm.models.swin_transformer.get_relative_position_index
  for wh, ww in ((7, 7), (3, 5)):
    np.testing.assert_array_equal(relative_position_index((wh, ww)), reference(wh, ww).numpy())


@pytest.mark.parametrize('old,new', [(7, 12), (12, 7), ((3, 5), (4, 6))])
def test_resize_timm_method_matches_timm(timm, old, new):
  import torch  # pylint: disable=import-outside-toplevel
  from timm.layers import resize_rel_pos_bias_table  # pylint: disable=import-outside-toplevel
  (oh, ow), (nh, nw) = hw(old), hw(new)
  table = np.random.RandomState(5).normal(size=((2 * oh - 1) * (2 * ow - 1), 3)).astype(np.float32)
  want = resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=(nh, nw),
                                   new_bias_shape=((2 * nh - 1) * (2 * nw - 1), 3),
                                   old_window_size=(oh, ow)).numpy()
  got = resize_relative_position_bias(table, old, new, method='timm')
  assert got.shape == want.shape and got.dtype == np.float32
  # N(0, 1) tables interpolated in float32 by two implementations: sums of up to 16 weighted terms,
  # ~16 eps = 2e-6 of the table's scale at worst; measured 3.4e-7.
  assert_close_to_scale(got, want, rtol=1e-5, what='resized table')
  with pytest.raises(ValueError, match="method 'nearest' is not one of"):
    resize_relative_position_bias(table, old, new, method='nearest')


def test_from_timm_rejects_other_layouts():
  with pytest.raises(ValueError, match='not a timm SwinTransformer state dict'):
    from_timm({'patch_embed.proj.weight': np.zeros((16, 3, 2, 2))}, TINY)
  flat = params_lib.flatten_numpy(_init(SwinTransformer(num_classes=5, **TINY)))
  state = to_timm(flat, TINY)
  with pytest.raises(ValueError, match=r'stages of \(2, 2\) blocks, the fields say depths'):
    from_timm(state, dict(TINY, depths=(2, 4)))
  with pytest.raises(ValueError, match='not part of this SwinTransformer'):
    from_timm({**state, 'extra.weight': np.zeros(1)}, TINY)
  # Buffers that old files may hold are skipped.
  assert from_timm({**state, 'layers.0.blocks.0.attn.relative_position_index': np.zeros(1)},
                   TINY).keys() == flat.keys()


def test_timm_export_loads_in_timm_with_the_same_logits(timm, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  from vit_jax.formats.timm import read_timm, write_timm  # pylint: disable=import-outside-toplevel
  fields = dict(TINY, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=3)
  rng = np.random.RandomState(6)
  flat = {k: (v + rng.normal(scale=0.2, size=v.shape)).astype(np.float32)
          for k, v in params_lib.flatten_numpy(_init(SwinTransformer(num_classes=5, **fields), 32, 48)).items()}
  arch = swin_family.FAMILY.infer(flat, image_size=(32, 48))
  write_timm(tmp_path, flat, arch)
  with open(tmp_path / 'config.json') as f:
    config = __import__('json').load(f)
  model = timm.create_model(config['architecture'], pretrained=False, **config['model_args'])
  model.load_state_dict(load_file(str(tmp_path / 'model.safetensors')), strict=True)
  x = _images(32, 48, seed=7)
  with torch.no_grad():
    want = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = np.asarray(SwinTransformer(num_classes=5, **fields).apply({'params': params_lib.unflatten(flat)}, x))
  assert_logits_match(got, want)
  back, back_arch, _ = read_timm(tmp_path)
  assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
  assert back_arch.image_size == (32, 48) and back_arch.model_config['window_size'] == 3
