"""Preprocessing: one decoded image at a time (files, TFDS), or whole in-memory batches at once.

Both paths make the same things: training crops (Inception / resize / pad-and-crop), flips,
RandAugment, and evaluation resizes (optionally resize-then-central-crop), as uint8 or float pixels
in [0, 255]; `normalize` maps them to [-1, 1] float32. The per-example path decodes with PIL (its
antialiased bilinear resize, JPEG draft decoding); the batch path resizes with separable
interpolation matrices, the same triangle filter, so 28x28 batches cost microseconds per image.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from vit_jax.data import augment as aug
from vit_jax.data.imageio import (Raw, convert_channels, display_size, load_image, open_image,
                                  to_array)
from vit_jax.shapes import hw


def normalize(images: np.ndarray, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None) -> np.ndarray:
  """uint8 or float pixels in [0, 255] -> float32 (x / 255 - mean) / std per channel.

  Without mean/std: [-1, 1] (mean = std = 0.5), what this project trains on and Google's checkpoints
  expect; a timm or Hugging Face checkpoint declares its own (e.g. ImageNet's).
  """
  x = np.asarray(images, np.float32)
  if mean is None and std is None:
    return x * np.float32(2.0 / 255.0) - np.float32(1.0)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x * np.float32(1.0 / 255.0) - mean) / std


as_hw = hw  # int or (h, w) -> (h, w): spelled once, in vit_jax.shapes


def _pad_of(cfg: Mapping[str, Any], out_hw: tuple[int, int]) -> int:
  return int(cfg['pad']) if cfg.get('pad') is not None else aug.default_pad(min(out_hw))


def draw(rng: np.random.Generator, n: int, h, w, cfg: Mapping[str, Any],
         out_hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """The random numbers `n` examples of size (h, w) need, always the same amount of them.

  Keys: `boxes` [n, 4] (crop, original pixels), `flip` [n] bool, `offsets` [n, 2] (pad-crop y, x),
  `ra_seed` [n] (RandAugment). Slicing every array with the same index selects examples.
  """
  boxes = aug.inception_boxes(rng, n, h, w, cfg['area_range'], cfg['aspect_range'])
  flip = rng.random(n) < 0.5
  pad = _pad_of(cfg, out_hw)
  offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
  ra_seed = rng.integers(0, 2**63, size=n)
  return {'boxes': boxes, 'flip': flip & bool(cfg['flip']), 'offsets': offsets, 'ra_seed': ra_seed}


def _finish(arr: np.ndarray, d: Mapping[str, np.ndarray], cfg: Mapping[str, Any],
            out_hw: tuple[int, int]) -> np.ndarray:
  """Pad-crop, flip and RandAugment of uint8 [n, H, W, C] already at the output size."""
  if cfg['crop'] != 'pad_crop' and not cfg.get('randaugment') and not d['flip'].any():
    return arr
  if cfg['crop'] == 'pad_crop':
    arr = aug.pad_crop(arr, d['offsets'], _pad_of(cfg, out_hw))
  if d['flip'].any():
    arr = np.where(d['flip'][:, None, None, None], arr[:, :, ::-1], arr)
  ra = cfg.get('randaugment')
  if ra:
    out = np.empty_like(arr)
    for k in range(len(arr)):
      img = Image.fromarray(arr[k, ..., 0] if arr.shape[-1] == 1 else arr[k])
      img = aug.randaugment(img, np.random.default_rng(d['ra_seed'][k]), **ra)
      out[k] = to_array(img)
    arr = out
  return arr


# --------------------------------------------------------------------------- one image at a time

def train_example(raw: Raw, rng: np.random.Generator, cfg: Mapping[str, Any],
                  out_hw: tuple[int, int], channels: int, name: str = '<image>') -> np.ndarray:
  """Decodes and augments one image: uint8 [H, W, channels]. Raises BadImageError."""
  img = open_image(raw, name)
  w, h = display_size(img)  # upright: boxes are drawn on the image as a viewer shows it
  d = draw(rng, 1, h, w, cfg, out_hw)
  box = tuple(d['boxes'][0]) if cfg['crop'] == 'inception' else None
  img = load_image(img, channels=channels, box=box, out_hw=out_hw, name=name)
  if d['flip'][0]:  # PIL's flip is a memcpy per row: cheaper than NumPy's copy of a strided view
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  d = dict(d, flip=np.zeros(1, bool))
  return _finish(to_array(img)[None], d, cfg, out_hw)[0]


def eval_example(raw: Raw, out_hw: tuple[int, int], channels: int, crop: bool = False,
                 name: str = '<image>') -> np.ndarray:
  """Resizes one image (crop=True: resize the short side to size/0.875, take the centre)."""
  img = open_image(raw, name)
  w, h = display_size(img)
  box = aug.central_box(h, w, out_hw) if crop else None
  return to_array(load_image(img, channels=channels, box=box, out_hw=out_hw, name=name))


# ------------------------------------------------------------------------------ whole batches

def resize_weights(in_size: int, starts: np.ndarray, lengths: np.ndarray,
                   out_size: int) -> np.ndarray:
  """float32 [n, out_size, in_size]: rows interpolate the window [start, start + length) of an axis.

  A triangle (bilinear) filter widened by the downscale factor, i.e. antialiased like PIL's
  BILINEAR; taps outside the image are dropped and the rest renormalised, as PIL does at borders.
  """
  starts = np.asarray(starts, np.float32).reshape(-1)
  scale = np.asarray(lengths, np.float32).reshape(-1) / out_size
  centre = starts[:, None] + (np.arange(out_size, dtype=np.float32) + 0.5) * scale[:, None]
  support = np.maximum(scale, 1.0)[:, None, None]
  x = np.arange(in_size, dtype=np.float32) + 0.5
  w = np.maximum(0.0, 1.0 - np.abs(x[None, None, :] - centre[:, :, None]) / support)
  return w / np.maximum(w.sum(-1, keepdims=True), 1e-8)


def _resample(x: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
  """[n, h, w, c], row weights [n|1, H, h], column weights [n|1, W, w] -> float32 [n, H, W, c]."""
  x = x.astype(np.float32)
  ey = 'nHh' if wy.shape[0] > 1 else 'Hh'
  ex = 'nWw' if wx.shape[0] > 1 else 'Ww'
  y = np.einsum(f'{ey},nhwc->nHwc', wy if ey == 'nHh' else wy[0], x, optimize=True)
  return np.einsum(f'{ex},nHwc->nHWc', wx if ex == 'nWw' else wx[0], y, optimize=True)


def resize_batch(images: np.ndarray, out_hw: tuple[int, int],
                 boxes: np.ndarray | None = None) -> np.ndarray:
  """uint8 [n, h, w, c] -> [n, H, W, c]: each image's box (or all of it) resized to `out_hw`.

  Returns the input unchanged (uint8) when no resampling is needed, else float32 in [0, 255].
  """
  n, h, w, _ = images.shape
  if boxes is None:
    if (h, w) == tuple(out_hw):
      return images
    boxes = np.array([[0.0, 0.0, w, h]], np.float32)
  wy = resize_weights(h, boxes[:, 1], boxes[:, 3] - boxes[:, 1], out_hw[0])
  wx = resize_weights(w, boxes[:, 0], boxes[:, 2] - boxes[:, 0], out_hw[1])
  return _resample(images, wy, wx)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return x if x.dtype == np.uint8 else np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_batch(images: np.ndarray, d: Mapping[str, np.ndarray], cfg: Mapping[str, Any],
                out_hw: tuple[int, int], channels: int) -> np.ndarray:
  """Augments in-memory uint8 [n, h, w, c] with the draws `d` (see `draw`): [n, H, W, channels].

  uint8 when nothing was resampled, else float32 in [0, 255] (no rounding to 8 bits on the way),
  unless RandAugment (which works on 8-bit images) is on.
  """
  images = convert_channels(images, channels)
  boxes = d['boxes'] if cfg['crop'] == 'inception' else None
  x = resize_batch(images, out_hw, boxes)
  if cfg.get('randaugment'):
    x = _to_uint8(x)
  return _finish(x, d, cfg, out_hw)


def eval_batch(images: np.ndarray, out_hw: tuple[int, int], channels: int,
               crop: bool = False) -> np.ndarray:
  """Resizes in-memory uint8 [n, h, w, c] for evaluation (crop: resize-then-central-crop)."""
  images = convert_channels(images, channels)
  if crop:
    _, h, w, _ = images.shape
    return resize_batch(images, out_hw, np.array([aug.central_box(h, w, out_hw)], np.float32))
  return resize_batch(images, out_hw)
