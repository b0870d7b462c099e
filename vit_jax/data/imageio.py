"""Decoding one image into the model's channel count, with the fast paths PIL offers.

Every image that enters the pipeline, whatever its format (JPEG, PNG, BMP, WebP, 16-bit PNG,
grayscale, RGBA, palette, CMYK, the first frame of an animated GIF/PNG/WebP), leaves here as a PIL
image in mode `L` (channels=1) or `RGB` (channels=3), turned upright as a viewer shows it (the EXIF
orientation tag, as `PIL.ImageOps.exif_transpose` applies it). A file that cannot be decoded raises
`BadImageError` naming it, so the loader can skip it with a warning instead of stopping the run.

Decompression bombs: an image whose header claims more than `max_image_pixels()` pixels (width x
height; default 89,478,485, PIL's own warning threshold, 268 MB as RGB) is refused from its header,
before a byte of it is decoded. Set the limit with the environment variable
`VIT_JAX_MAX_IMAGE_PIXELS=N` (`none`: no limit), or `set_max_image_pixels(N)`, which sets that
variable so that worker processes started afterwards share it.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Union
import warnings

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif')
MAX_PIXELS_ENV = 'VIT_JAX_MAX_IMAGE_PIXELS'
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: where PIL warns of a bomb
# EXIF orientation (tag 0x0112) -> the transposition that shows the image upright, as
# PIL.ImageOps.exif_transpose applies it; 5-8 swap width and height.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
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


def max_image_pixels() -> Optional[int]:
  """Width x height above which an encoded image is refused unread (None: no limit)."""
  value = os.environ.get(MAX_PIXELS_ENV, '').strip().lower()
  if not value:
    return DEFAULT_MAX_PIXELS
  if value in ('none', '0'):
    return None
  try:
    limit = int(value.replace('_', ''))
  except ValueError:
    limit = -1
  if limit < 0:
    raise ValueError(f'{MAX_PIXELS_ENV}={value!r} must be a pixel count (width x height), e.g. '
                     f'{DEFAULT_MAX_PIXELS}, or `none` for no limit')
  return limit


def set_max_image_pixels(limit: Optional[int]) -> None:
  """Sets the decompression-bomb limit (None: none) for this process and workers it starts later."""
  os.environ[MAX_PIXELS_ENV] = 'none' if limit is None else str(int(limit))


def _check_pixels(img: Image.Image, name: str, limit: Optional[int]) -> None:
  w, h = img.size
  if w <= 0 or h <= 0:
    raise BadImageError(name, f'its header claims {w}x{h} pixels')
  if limit is not None and w * h > limit:
    raise BadImageError(name, f'its header claims {w}x{h} = {w * h:,} pixels, over the limit of '
                        f'{limit:,} (a decompression bomb, or a huge image: raise the limit with '
                        f'{MAX_PIXELS_ENV}=N); refused before decoding')


def open_image(raw: Raw, name: str = '<image>') -> Image.Image:
  """A lazily decoded PIL image from encoded bytes, a uint8 [H,W] / [H,W,C] array, or PIL image.

  Only the header is read here (size and mode are known); pixels are decoded by `load_image`.
  Encoded images over `max_image_pixels()` are refused here, from the header.
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
  limit = max_image_pixels()
  # PIL refuses above 2 x its own limit (a process-wide setting): lift it when ours is higher.
  if limit is None:
    Image.MAX_IMAGE_PIXELS = None
  elif Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = -(-limit // 2)
  try:
    with warnings.catch_warnings():  # our own limit decides; PIL's warning would repeat it
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(raw))
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, bombs, ...
    raise BadImageError(name, e) from e
  _check_pixels(img, name, limit)
  return img


def orientation(img: Image.Image) -> int:
  """The EXIF orientation (1-8; 1 = stored upright); unreadable EXIF counts as 1."""
  try:
    value = int(img.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # pylint: disable=broad-except  # a broken EXIF block: show the image as stored
    return 1
  return value if value in _UPRIGHT else 1


def display_size(img: Image.Image) -> tuple[int, int]:
  """(width, height) as a viewer shows the image, i.e. after its EXIF orientation."""
  w, h = img.size
  return (h, w) if orientation(img) >= 5 else (w, h)


def _draft(img: Image.Image, mode: str, box: Box, out_hw: tuple[int, int], swapped: bool) -> Box:
  """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop still covers `out_hw` pixels.

  DCT-domain downscaling is several times cheaper than decoding at full size and then resizing;
  the result is as sharp as the antialiased resize that follows. `box` is in upright pixels
  (`swapped`: the stored image is turned by 90 degrees); returns it in the new upright pixels.
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
  if swapped:
    sx, sy = sy, sx
  return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
  """Converts any PIL mode to `L` or `RGB`; transparency is composited over white."""
  if img.mode == mode:
    return img
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    # 16-bit and float images: scale their range to 8 bits instead of clipping at 255.
    arr = np.asarray(img, dtype=np.float32)
    top = 65535.0 if img.mode.startswith('I;16') or arr.max() > 255 else 255.0
    img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    return img if mode == 'L' else img.convert(mode)
  if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba)
  return img.convert(mode)


def load_image(raw: Raw, *, channels: int, box: Box | None = None, out_hw: tuple[int, int] | None,
               name: str = '<image>') -> Image.Image:
  """Decodes `raw`, crops `box` (original pixels; None = all) and resizes it to `out_hw` (H, W).

  Pixels and `box` are upright (EXIF orientation applied). Returns a PIL image in mode `L` or
  `RGB`. The resize is PIL's antialiased bilinear filter. `out_hw=None` keeps the crop's size.
  Raises `BadImageError` for anything undecodable.
  """
  mode = mode_for(channels)
  img = open_image(raw, name)
  try:
    turn = orientation(img)
    w, h = img.size[::-1] if turn >= 5 else img.size
    box = (0.0, 0.0, float(w), float(h)) if box is None else box
    if out_hw is not None:
      box = _draft(img, mode, box, out_hw, swapped=turn >= 5)
    img.load()
    if turn != 1:
      img = img.transpose(_UPRIGHT[turn])
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
  """(height, width) upright, from the header alone."""
  if isinstance(raw, np.ndarray):
    return int(raw.shape[0]), int(raw.shape[1])
  w, h = display_size(open_image(raw, name))
  return h, w


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

