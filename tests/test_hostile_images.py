"""Hostile images: every input is read correctly (pixel values and orientation asserted) or refused
with a `BadImageError` naming the file, which the loader skips with a warning and counts.

Property-based (hypothesis): arbitrary, truncated and bit-flipped bytes under any image extension;
decompression bombs refused from the header; 16-bit, palette, alpha, CMYK, progressive, animated and
EXIF-rotated files read to the values a viewer shows; a training run over a folder with one file of
every bad kind finishes and reports them. Counts go to $VIT_JAX_RELIABILITY_LOG
(tests/reliability_log.py).
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
from PIL import Image, ImageFile, ImageOps
import pytest

from tests.reliability_log import record
from vit_jax.data import eval_batches, get_source, train_iterator
from vit_jax.data import imageio
from vit_jax.data import preprocess as pp
from vit_jax.data.imageio import BadImageError, load_image, to_array

_QUIET = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST, SLOW = settings(max_examples=25, **_QUIET), settings(max_examples=400, **_QUIET)
FORMATS = {'PNG': {}, 'JPEG': {}, 'JPEG-progressive': {'progressive': True}, 'GIF': {},
           'WEBP': {}, 'BMP': {}}
EXTS = ('.jpg', '.jpeg', '.png', '.gif', '.webp', '.bmp')


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt.split('-')[0], **{**FORMATS.get(fmt, {}), **kw})
  return buf.getvalue()


def decode(data: bytes, channels: int = 3, out_hw=None, name: str = '<image>') -> np.ndarray:
  return to_array(load_image(data, channels=channels, out_hw=out_hw, name=name))


def _chunk(tag: bytes, body: bytes) -> bytes:
  return struct.pack('>I', len(body)) + tag + body + struct.pack('>I', zlib.crc32(tag + body))


def png(width: int, height: int, depth: int, ctype: int, rows: bytes) -> bytes:
  """A PNG written by hand (any header, e.g. a bomb's, and 16-bit colour PIL cannot write)."""
  ihdr = struct.pack('>IIBBBBB', width, height, depth, ctype, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', zlib.compress(rows)) +
          _chunk(b'IEND', b''))


def bombs() -> dict[str, bytes]:
  """Small files whose headers claim 10^10 (PNG, BMP) or 4.2 x 10^9 pixels (JPEG, GIF)."""
  out = {'bomb.png': png(100_000, 100_000, 8, 2, b'\0' * 4096)}
  jpeg = bytearray(enc(Image.new('RGB', (16, 16)), 'JPEG'))
  sof = jpeg.find(b'\xff\xc0')
  jpeg[sof + 5:sof + 9] = struct.pack('>HH', 65000, 65000)
  out['bomb.jpg'] = bytes(jpeg)
  gif = bytearray(enc(Image.new('P', (16, 16)), 'GIF'))
  gif[6:10] = struct.pack('<HH', 65535, 65535)  # the screen; the frame descriptor follows
  desc = gif.find(b'\x2c', 13)
  gif[desc + 5:desc + 9] = struct.pack('<HH', 65535, 65535)
  out['bomb.gif'] = bytes(gif)
  bmp = bytearray(enc(Image.new('RGB', (16, 16)), 'BMP'))
  bmp[18:26] = struct.pack('<ii', 100_000, 100_000)
  out['bomb.bmp'] = bytes(bmp)
  return out


def asymmetric(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
  """uint8 [h, w, 3]: smooth ramps plus a bright corner block, different under every flip/turn."""
  y, x = np.mgrid[0:h, 0:w]
  arr = np.stack([255 * x // w, 255 * y // h, np.full_like(x, 60 + 40 * seed % 100)], -1)
  arr[: h // 3, : w // 4] = (250, 250, 250)
  return arr.astype(np.uint8)


GOOD = {fmt: enc(Image.fromarray(asymmetric(20, 28)), fmt) for fmt in FORMATS}
GOOD_PIXELS = {fmt: decode(data) for fmt, data in GOOD.items()}


@st.composite
def hostile_bytes(draw):
  fmt = draw(st.sampled_from(sorted(FORMATS)))
  kind = draw(st.sampled_from(['empty', 'random', 'truncated', 'bitflip', 'header+random']))
  base = GOOD[fmt]
  if kind == 'empty':
    data = b''
  elif kind == 'random':
    data = draw(st.binary(min_size=1, max_size=1024))
  elif kind == 'truncated':
    data = base[:draw(st.integers(1, len(base) - 1))]
  elif kind == 'bitflip':
    bit = draw(st.integers(0, 8 * len(base) - 1))
    data = bytearray(base)
    data[bit // 8] ^= 1 << (bit % 8)
    data = bytes(data)
  else:
    data = base[:draw(st.integers(4, 32))] + draw(st.binary(max_size=512))
  return fmt, kind, data, draw(st.sampled_from(EXTS)), draw(st.sampled_from([1, 3]))


def _check_hostile(example) -> None:
  fmt, kind, data, ext, channels = example
  name = f'/data/cls/hostile file{ext}'
  try:
    out = decode(data, channels, (8, 6), name=name)
  except BadImageError as e:  # the loader skips exactly this, counting it
    assert name in str(e), e
    record('images', f'{kind}/{fmt.lower()}', 'skipped')
    return
  assert out.shape == (8, 6, channels) and out.dtype == np.uint8
  if kind == 'truncated':  # never half an image: a cut file that reads must be the whole file
    full = decode(GOOD[fmt], channels, (8, 6))
    np.testing.assert_array_equal(out, full)
  record('images', f'{kind}/{fmt.lower()}', 'read')


@FAST
@given(hostile_bytes())
def test_any_bytes_read_whole_or_refused_naming_the_file(example):
  _check_hostile(example)


@pytest.mark.slow
@SLOW
@given(hostile_bytes())
def test_any_bytes_read_whole_or_refused_naming_the_file_many(example):
  _check_hostile(example)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_truncated_file_is_never_half_read(fmt):
  """Cut into the pixel data: an error naming the file, never the part that decoded."""
  data = GOOD[fmt]
  for cut in (0.3, 0.6):
    with pytest.raises(BadImageError, match='cut file'):
      decode(data[: int(len(data) * cut)], 3, (8, 6), name=f'cut file.{fmt.lower()}')
    record('images', f'truncated/{fmt.lower()}', 'skipped')


@pytest.mark.parametrize('name', sorted(bombs()))
def test_decompression_bomb_refused_from_the_header(name, monkeypatch):
  decoded = []
  real_load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, 'load',
                      lambda self: decoded.append(self.size) or real_load(self))
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # PIL's own guard off: ours must hold
  monkeypatch.delenv(imageio.MAX_PIXELS_ENV, raising=False)
  data = bombs()[name]
  with pytest.raises(BadImageError, match=rf'{name}: its header claims .* pixels, over the limit'):
    decode(data, 3, (8, 8), name=name)
  with pytest.raises(BadImageError, match='over the limit'):
    imageio.image_size(data, name=name)
  assert decoded == [], 'the bomb was decoded before being refused'
  record('images', f'bomb/{name}', 'skipped')


def test_pixel_limit_is_configurable(monkeypatch):
  data = enc(Image.fromarray(asymmetric(30, 40)), 'PNG')  # 1,200 pixels
  monkeypatch.setenv(imageio.MAX_PIXELS_ENV, '')  # so that the end of the test undoes the next
  imageio.set_max_image_pixels(1199)
  with pytest.raises(BadImageError, match='1,200 pixels, over the limit of 1,199'):
    decode(data, name='x.png')
  monkeypatch.setenv(imageio.MAX_PIXELS_ENV, '1200')
  assert decode(data).shape == (30, 40, 3)
  monkeypatch.setenv(imageio.MAX_PIXELS_ENV, 'lots')
  with pytest.raises(ValueError, match=imageio.MAX_PIXELS_ENV):
    decode(data)
  monkeypatch.delenv(imageio.MAX_PIXELS_ENV)
  assert imageio.max_image_pixels() == imageio.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


@FAST
@given(st.sampled_from([(0, 1), (2, 3), (4, 2), (6, 4)]), st.integers(0, 2**32 - 1),
       st.sampled_from([1, 3]))
def test_16_bit_png_scaled_to_8_bits(ctype_c, seed, channels):
  ctype, c = ctype_c
  v = np.random.default_rng(seed).integers(0, 65536, (3, 5, c), dtype=np.uint16)
  rows = b''.join(b'\0' + v[y].astype('>u2').tobytes() for y in range(3))
  out = decode(png(5, 3, 16, ctype, rows), channels).astype(np.float64)
  colour = v[..., :3 if c >= 3 else 1].astype(np.float64) / 257.0
  colour = np.repeat(colour, 3, -1) if colour.shape[-1] == 1 else colour
  if c in (2, 4):  # alpha: composited over white
    a = v[..., -1:].astype(np.float64) / 65535.0
    colour = colour * a + 255.0 * (1 - a)
  want = colour @ np.array([0.299, 0.587, 0.114])[:, None] if channels == 1 else colour
  # PIL keeps the high byte of 16-bit colour (v >> 8, within 1 of v / 257) and of alpha; the
  # composite adds up to 255 x that alpha error, and the 8-bit result rounds (0.5).
  tol = 2.5 if c in (2, 4) else 1.5
  assert np.abs(out - want).max() <= tol, (ctype, np.abs(out - want).max())
  record('images', f'png16/ctype{ctype}/to{channels}', 'read')


@FAST
@given(st.integers(2, 256), st.integers(0, 2**32 - 1), st.booleans())
def test_palette_png_reads_palette_colours(colours, seed, transparent):
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
  index = rng.integers(0, colours, (6, 7), dtype=np.uint8)
  img = Image.fromarray(index, 'P')
  img.putpalette(palette.ravel().tolist())
  kw = {'transparency': int(index[0, 0])} if transparent else {}
  want = palette[index].copy()
  if transparent:
    want[index == index[0, 0]] = 255
  np.testing.assert_array_equal(decode(enc(img, 'PNG', **kw)), want)
  record('images', f'palette/transparent={transparent}', 'read')


@FAST
@given(st.tuples(*[st.integers(0, 255)] * 4), st.sampled_from(['RGBA', 'LA']))
def test_alpha_composited_over_white(rgba, mode):
  img = Image.new('RGBA', (5, 4), rgba).convert(mode)
  arr = np.asarray(img, np.float64)
  colour = np.repeat(arr[..., :1], 3, -1) if mode == 'LA' else arr[..., :3]
  a = arr[..., -1:] / 255.0
  want = colour * a + 255.0 * (1.0 - a)
  assert np.abs(decode(enc(img, 'PNG')) - want).max() <= 1.0
  record('images', f'alpha/{mode}', 'read')


@FAST
@given(st.tuples(*[st.integers(0, 255)] * 4))
def test_cmyk_jpeg_converted_with_black(cmyk):
  out = decode(enc(Image.new('CMYK', (16, 16), cmyk), 'JPEG', quality=95)).astype(np.float64)
  want = (255.0 - np.array(cmyk[:3])) * (255.0 - cmyk[3]) / 255.0
  assert np.abs(out - want).max() <= 4.0, (out[0, 0], want)  # JPEG's rounding on a flat colour
  record('images', 'cmyk-jpeg', 'read')


def test_progressive_jpeg_reads_like_baseline():
  img = Image.fromarray(asymmetric(48, 64))
  prog, base = enc(img, 'JPEG-progressive', quality=95), enc(img, 'JPEG', quality=95)
  assert b'\xff\xc2' in prog and b'\xff\xc2' not in base  # SOF2: it really is progressive
  diff = np.abs(decode(prog).astype(int) - decode(base).astype(int))
  assert diff.max() <= 3 and np.abs(decode(prog).astype(int) - asymmetric(48, 64)).mean() < 3
  record('images', 'progressive-jpeg', 'read')


@pytest.mark.parametrize('fmt', ['GIF', 'PNG', 'WEBP'])
def test_animated_file_reads_its_first_frame(fmt):
  colours = [(200, 30, 40), (10, 220, 90), (0, 0, 255)]
  frames = [Image.new('RGB', (6, 5), c) for c in colours]
  data = enc(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
  assert getattr(Image.open(io.BytesIO(data)), 'n_frames', 1) == 3
  assert (decode(data) == colours[0]).all()
  record('images', f'animated/{fmt.lower()}', 'read')


@FAST
@given(st.integers(0, 2**32 - 1))
def test_grey_into_three_channels_and_colour_into_one(seed):
  rng = np.random.default_rng(seed)
  grey = rng.integers(0, 256, (5, 6), dtype=np.uint8)
  out = decode(enc(Image.fromarray(grey), 'PNG'), 3)
  assert (out == grey[..., None]).all()
  colour = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  luma = colour.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601
  assert np.abs(decode(enc(Image.fromarray(colour), 'PNG'), 1)[..., 0] - luma).max() <= 1.0
  record('images', 'grey-to-rgb', 'read')
  record('images', 'rgb-to-grey', 'read')


def exif_file(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
  """A file storing `upright` turned so that a viewer applying `orientation` shows it upright."""
  store = {1: None, 2: 0, 3: 3, 4: 1, 5: 5, 6: 2, 7: 6, 8: 4}[orientation]  # inverse transposes
  img = Image.fromarray(upright)
  img = img if store is None else img.transpose(Image.Transpose(store))
  exif = Image.Exif()
  exif[0x0112] = orientation
  stored = enc(img, fmt, exif=exif.tobytes(), quality=95)
  # The viewer's oracle: PIL's exif_transpose must show the upright picture.
  shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(stored))).convert('RGB'))
  assert shown.shape == upright.shape and np.abs(shown.astype(int) - upright).mean() < 3
  return stored


@FAST
@given(st.integers(1, 8), st.integers(0, 2**32 - 1), st.sampled_from(['PNG', 'JPEG']))
def test_exif_rotated_photo_is_trained_as_a_viewer_shows_it(orientation, seed, fmt):
  upright = asymmetric(48, 80, seed % 7)
  rotated, plain = exif_file(upright, orientation, fmt), enc(Image.fromarray(upright), fmt,
                                                             quality=95)
  assert imageio.image_size(rotated) == (48, 80)
  tol = 0 if fmt == 'PNG' else 8  # two JPEG encodings of one picture: 4 levels measured
  cfg = pp.aug.augment_config('inception_crop')  # random boxes in upright pixels, JPEG draft mode
  for out_hw in ((12, 20), (40, 40)):
    got = pp.train_example(rotated, np.random.default_rng(seed), cfg, out_hw, 3).astype(int)
    want = pp.train_example(plain, np.random.default_rng(seed), cfg, out_hw, 3)
    assert np.abs(got - want).max() <= tol and np.abs(got - want).mean() <= tol / 8, orientation
  got = pp.eval_example(rotated, (16, 16), 1, crop=True).astype(int)
  assert np.abs(got - pp.eval_example(plain, (16, 16), 1, crop=True)).max() <= tol
  record('images', f'exif-orientation-{orientation}/{fmt.lower()}', 'read')


def test_exif_rotated_photo_is_predicted_as_a_viewer_shows_it(tmp_path):
  from vit_jax.families import registry
  from vit_jax.families.base import Architecture
  from vit_jax.predict import Predictor
  arch = Architecture(dict(registry.get_model_config('ViT-testing')), 2, (24, 40), 3)
  predictor = Predictor(arch, None, None)
  upright = asymmetric(48, 80)
  (tmp_path / 'plain.jpg').write_bytes(enc(Image.fromarray(upright), 'JPEG', quality=95))
  want = predictor.preprocess(str(tmp_path / 'plain.jpg'))
  for orientation in range(2, 9):
    path = tmp_path / f'turned{orientation}.jpg'
    path.write_bytes(exif_file(upright, orientation, 'JPEG'))
    got = predictor.preprocess(str(path))
    # [-1, 1] pixels: 8/255 levels of JPEG noise at most (4 measured); turned wrongly: > 100.
    assert got.shape == (24, 40, 3) and np.abs(got - want).max() <= 2 * 8 / 255, orientation
    record('images', f'exif-orientation-{orientation}/predict', 'read')


def write_hostile_folder(root, bad_in: str = 'train') -> list[str]:
  """root/{train,test}/{a,b}/ with 3 good images per class, and one file of every bad kind in
  root/<bad_in>/a. Returns the bad files' paths."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in ('a', 'b'):
      os.makedirs(os.path.join(root, split, c))
      for k in range(3):
        arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, split, c, f'{k}.png'))
  cut = GOOD['JPEG'][: len(GOOD['JPEG']) // 2]
  bad = {'zero bytes.jpg': b'', 'truncated.jpg': cut, 'noise.png': rng.bytes(300),
         'notes.webp': b'<html>not an image</html>', **bombs()}
  paths = []
  for name, data in bad.items():
    paths.append(os.path.join(root, bad_in, 'a', name))
    with open(paths[-1], 'wb') as f:
      f.write(data)
  return paths


def test_loader_skips_every_bad_kind_with_a_warning_and_counts_it(tmp_path, caplog):
  root = str(tmp_path / 'hostile')
  bad = write_hostile_folder(root)
  src = get_source(root, split='train')
  assert len(src) == 6 + len(bad)
  it = train_iterator(src, image_size=8, channels=3, global_batch_size=4, seed=0,
                      augment='inception_crop', num_classes=2, prefetch=0)
  with caplog.at_level(logging.WARNING, logger='vit_jax.data.loader'):
    for _ in range(2 * len(src) // 4 + 1):  # two epochs: every file is met
      batch = next(it)
      assert batch['image'].shape == (4, 8, 8, 3) and np.isfinite(batch['image']).all()
  it.close()
  assert it.skipped_images == len(bad)
  for path in bad:
    assert sum(path in r.getMessage() for r in caplog.records) == 1, path  # warned once each
    record('images', f'loader/{os.path.basename(path)}', 'skipped')
  write_hostile_folder(str(tmp_path / 'ev'), bad_in='test')
  ev = eval_batches(get_source(str(tmp_path / 'ev'), split='test'), image_size=8, channels=1,
                    global_batch_size=4)
  assert sum(int(b['mask'].sum()) for b in ev) == 6 and ev.skipped_images == len(bad)


@pytest.mark.slow  # ~12 s of CPU (compiles a train and an eval step)
def test_training_run_finishes_over_bad_files_and_reports_them(tmp_path):
  import json
  from configs import quickstart
  from vit_jax.train import loop
  root = str(tmp_path / 'hostile')
  bad = write_hostile_folder(root)
  c = quickstart.get_config('model=ViT-testing')
  c.model.name, c.model.patch_size, c.dataset, c.image_size, c.channels = (
      'ViT-testing', 4, root, 16, 3)
  c.batch_size = c.eval_batch_size = 4
  # One epoch (every bad file met once) and a bit; evaluation and a checkpoint at the end.
  c.total_steps, c.warmup_steps, c.log_every, c.progress = (6 + len(bad)) // 4 + 1, 1, 1, False
  result = loop.train_and_evaluate(c, str(tmp_path / 'w'))
  assert result.step == c.total_steps and result.skipped_images == len(bad)
  assert result.eval['eval_count'] == 6 and np.isfinite(result.train_loss)
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['skipped_images'] == len(bad)
  record('images', 'training-run-with-bad-files', 'skipped')
