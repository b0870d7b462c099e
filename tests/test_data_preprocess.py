"""Decoding and preprocessing: any mode and size in, the configured size, channels and range out."""
import io

import numpy as np
import pytest
from PIL import Image

from vit_jax.data import augment as aug
from vit_jax.data import preprocess as pp
from vit_jax.data.imageio import BadImageError, convert_channels, load_image, to_array


def encoded(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def rgb(h=30, w=50, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize('mode,fmt', [('RGB', 'JPEG'), ('L', 'PNG'), ('RGBA', 'PNG'), ('P', 'PNG'),
                                      ('CMYK', 'JPEG'), ('I;16', 'PNG'), ('LA', 'PNG'),
                                      ('RGB', 'BMP'), ('RGB', 'WEBP')])
@pytest.mark.parametrize('channels', [1, 3])
def test_any_mode_to_channels(mode, fmt, channels):
  img = rgb()
  img = img.convert('L').convert('I;16') if mode == 'I;16' else img.convert(mode)
  out = to_array(load_image(encoded(img, fmt), channels=channels, out_hw=(16, 12)))
  assert out.shape == (16, 12, channels) and out.dtype == np.uint8


def test_alpha_composited_over_white_and_16_bit_scaled():
  clear = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
  assert (to_array(load_image(encoded(clear, 'PNG'), channels=3, out_hw=None)) == 255).all()
  deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert (to_array(load_image(encoded(deep, 'PNG'), channels=1, out_hw=None)) == 255).all()


def test_bad_bytes_raise_bad_image_naming_the_file():
  with pytest.raises(BadImageError, match='notes.png'):
    load_image(b'not an image', channels=3, out_hw=(8, 8), name='notes.png')
  data = encoded(rgb(64, 64), 'JPEG')
  with pytest.raises(BadImageError, match='cut.jpg'):
    load_image(data[: len(data) // 2], channels=3, out_hw=(8, 8), name='cut.jpg')


def test_convert_channels():
  x = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
  gray = convert_channels(x, 1)
  assert gray.shape == (2, 3, 3, 1)
  ref = np.asarray(Image.fromarray(x[0]).convert('L'))
  assert np.abs(gray[0, ..., 0].astype(int) - ref).max() <= 1
  assert convert_channels(gray, 3).shape == (2, 3, 3, 3)


def test_batch_resize_matches_pil():
  """The vectorised resize is PIL's antialiased bilinear filter, up and down."""
  x = np.random.default_rng(0).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
  for out in (14, 20, 40):
    ours = pp.resize_batch(x, (out, out))[0, ..., 0]
    ref = np.asarray(Image.fromarray(x[0, ..., 0]).resize((out, out), Image.BILINEAR), np.float32)
    assert np.abs(ours - ref).mean() < 1.0, out
  box = np.array([[3.0, 5.0, 20.0, 25.0]])
  ours = pp.resize_batch(x, (10, 10), box)[0, ..., 0]
  ref = np.asarray(Image.fromarray(x[0, ..., 0]).resize((10, 10), Image.BILINEAR,
                                                        box=tuple(box[0])), np.float32)
  assert np.abs(ours - ref).mean() < 1.0


def test_inception_boxes_respect_area_and_bounds():
  rng = np.random.default_rng(0)
  boxes = aug.inception_boxes(rng, 2000, 375, 500, (0.05, 1.0))
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500 + 1e-6).all()
  assert (boxes[:, 3] <= 375 + 1e-6).all()
  area = w * h / (375 * 500)
  assert area.min() >= 0.05 - 1e-6 and area.max() <= 1.0 + 1e-6 and area.min() < 0.1


@pytest.mark.parametrize('preset', sorted(aug.PRESETS))
def test_presets_any_size_in_configured_size_out(preset):
  cfg = aug.augment_config(preset)
  rng = np.random.default_rng(0)
  raw = encoded(rgb(37, 61), 'JPEG')
  out = pp.train_example(raw, rng, cfg, (24, 24), 3, 'x.jpg')
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  batch = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  d = pp.draw(rng, 4, 28, 28, cfg, (32, 32))
  x = pp.normalize(pp.train_batch(batch, d, cfg, (32, 32), 3))
  assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_augment_config_overrides_and_typos():
  cfg = aug.augment_config({'preset': 'pad_crop_flip', 'mixup': 0.2, 'randaugment': {'magnitude': 5}})
  assert cfg['crop'] == 'pad_crop' and cfg['mixup'] == 0.2
  assert cfg['randaugment'] == {'num_layers': 2, 'magnitude': 5.0}
  with pytest.raises(ValueError, match='mixpu'):
    aug.augment_config({'mixpu': 0.2})
  with pytest.raises(ValueError, match='unknown augmentation preset'):
    aug.augment_config('strong')


def test_eval_is_deterministic_and_central_crop():
  raw = encoded(rgb(40, 80), 'PNG')
  a = pp.eval_example(raw, (16, 16), 3)
  np.testing.assert_array_equal(a, pp.eval_example(raw, (16, 16), 3))
  assert aug.central_box(40, 80, (16, 16)) == pytest.approx((22.5, 2.5, 57.5, 37.5))
  assert pp.eval_example(raw, (16, 16), 3, crop=True).shape == (16, 16, 3)


@pytest.mark.parametrize('which', ['mixup', 'cutmix'])
def test_mix_keeps_label_mass(which):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 8)]
  cfg = aug.augment_config({which: 1.0})
  mx, my = aug.mix_batch(np.random.default_rng(3), x, y, cfg)
  assert mx.shape == x.shape and my.shape == y.shape
  np.testing.assert_allclose(my.sum(1), 1.0, rtol=1e-6)
  assert not np.allclose(mx, x) and (my.max(1) < 1).any()


def test_randaugment_runs_every_op_on_gray_and_rgb():
  for img in (rgb(20, 20), rgb(20, 20).convert('L')):
    for op in aug.RANDAUGMENT_OPS:
      out = aug._OPS[op](img, 0.9, np.random.default_rng(0))
      assert out.size == img.size and out.mode == img.mode, op
