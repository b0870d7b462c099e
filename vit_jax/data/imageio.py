"""Decoding one image into the model's channel count, with the fast paths PIL offers.

Every image that enters the pipeline, whatever its format (JPEG, PNG, BMP, WebP, 16-bit PNG,
grayscale, RGBA, palette, CMYK), leaves here as a PIL image in mode `L` (channels=1) or `RGB`
(channels=3). A file that cannot be decoded raises `BadImageError` naming it, so the loader can skip
it with a warning instead of stopping the run.
"""
from __future__ import annotations

import io
from typing import Union

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
# Never decode a truncated file into half an image: a corrupt file must be reported, not trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False

Raw = Union[bytes, np.ndarray, Image.Image]
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, PIL's convention


class BadImageError(ValueError):
  """An image that cannot be decoded; `name` is the file (or record) it came from."""

  def __init__(self, name: str, cause: BaseException | str):
    super().__init__(f'cannot decode image {name}: {cause}')
    self.name = name


def mode_for(channels: int) -> str:
  if channels == 1:
    return 'L'
  if channels == 3:
    return 'RGB'
  raise ValueError(f'images can be loaded with 1 or 3 channels, not {channels}')


def open_image(raw: Raw, name: str = '<image>') -> Image.Image:
  """A lazily decoded PIL image from encoded bytes, a uint8 [H,W] / [H,W,C] array, or PIL image.

  Only the header is read here (size and mode are known); pixels are decoded by `load_image`.
  """
  if isinstance(raw, Image.Image):
    return raw
  if isinstance(raw, np.ndarray):
    arr = raw
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.dtype != np.uint8:
      raise BadImageError(name, f'arrays must be uint8, got {arr.dtype}')
    return Image.fromarray(arr)
  try:
    return Image.open(io.BytesIO(raw))
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise BadImageError(name, e) from e


def _draft(img: Image.Image, mode: str, box: Box, out_hw: tuple[int, int]) -> Box:
  """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop still covers `out_hw` pixels.

  DCT-domain downscaling is several times cheaper than decoding at full size and then resizing;
  the result is as sharp as the antialiased resize that follows. Returns `box` in the new pixels.
  """
  if img.format != 'JPEG':
    return box
  bw, bh = box[2] - box[0], box[3] - box[1]
  reduce = 1
  for r in (8, 4, 2):
    if bw / r >= out_hw[1] and bh / r >= out_hw[0]:
      reduce = r
      break
  w, h = img.size
  # Ask for the draft mode even at scale 1: it makes libjpeg emit L or RGB directly.
  img.draft(mode if img.mode in ('L', 'RGB') else None, (w // reduce, h // reduce))
  sx, sy = img.size[0] / w, img.size[1] / h
  return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
  """Converts any PIL mode to `L` or `RGB`; transparency is composited over white."""
  if img.mode == mode:
    return img
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    # 16-bit and float images: scale their range to 8 bits instead of clipping at 255.
    arr = np.asarray(img, dtype=np.float32)
    top = 65535.0 if img.mode.startswith('I;16') or arr.max() > 255 else 255.0
    img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
    return img if mode == 'L' else img.convert(mode)
  if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba)
  return img.convert(mode)


def load_image(raw: Raw, *, channels: int, box: Box | None = None, out_hw: tuple[int, int] | None,
               name: str = '<image>') -> Image.Image:
  """Decodes `raw`, crops `box` (original pixels; None = all) and resizes it to `out_hw` (H, W).

  Returns a PIL image in mode `L` or `RGB`. The resize is PIL's antialiased bilinear filter.
  `out_hw=None` keeps the crop's size. Raises `BadImageError` for anything undecodable.
  """
  mode = mode_for(channels)
  img = open_image(raw, name)
  try:
    full = (0.0, 0.0, float(img.size[0]), float(img.size[1]))
    box = full if box is None else box
    if out_hw is not None:
      box = _draft(img, mode, box, out_hw)
    img.load()
    img = _to_mode(img, mode)
    if out_hw is not None:
      if (img.size[1], img.size[0]) == tuple(out_hw) and box == (0, 0, img.size[0], img.size[1]):
        return img
      return img.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=box)
    if box != (0.0, 0.0, float(img.size[0]), float(img.size[1])):
      return img.crop(tuple(int(round(v)) for v in box))
    return img
  except BadImageError:
    raise
  except Exception as e:  # truncated files surface here, at decode time
    raise BadImageError(name, e) from e


def image_size(raw: Raw, name: str = '<image>') -> tuple[int, int]:
  """(height, width) from the header alone."""
  if isinstance(raw, np.ndarray):
    return int(raw.shape[0]), int(raw.shape[1])
  img = open_image(raw, name)
  return img.size[1], img.size[0]


def to_array(img: Image.Image) -> np.ndarray:
  """uint8 [H, W, C] (C = 1 for mode L)."""
  arr = np.asarray(img, dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [..., H, W, c] with c in {1, 3, 4} to [..., H, W, channels], vectorised.

  RGB to gray uses ITU-R 601 luma, as PIL does; gray to RGB repeats; alpha is dropped.
  """
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 4:
    return convert_channels(images[..., :3], channels)
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if c == 3 and channels == 1:
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f'cannot convert {c}-channel images to {channels} channels')

