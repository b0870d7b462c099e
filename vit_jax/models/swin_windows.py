"""Window geometry of the Swin Transformer (`vit_jax.models.swin`): stage maps, windows and shifts,
the relative-position index, the shifted-window mask, and window partitioning. Pure functions of
shapes (numpy, or jax.numpy on the activations); they follow timm 1.0's `swin_transformer.py`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import numpy as np

from vit_jax.models.vit import pair

MASK_VALUE = -100.0  # What timm adds between shifted regions; exp(-100) underflows to 0 in float32.


def stage_windows(grid: tuple[int, int], window: Union[int, Sequence[int]]
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """(window, shift) that a stage with an [h, w] token map uses, per axis (timm's clamping).

  A map no larger than the window along an axis gets a window equal to the map there and no shift.
  """
  wh, ww = pair(window)
  win = tuple(min(r, w) for r, w in zip(grid, (wh, ww)))
  shift = tuple(0 if r <= w else w // 2 for r, w in zip(grid, win))
  return win, shift


def stage_grids(image_hw: tuple[int, int], patch_size: int, num_stages: int
                ) -> list[tuple[int, int]]:
  """Token-map sizes [(h_s, w_s)] of the stages: ceil(H / p / 2^s) (merging pads odd maps, as
  timm); raises ValueError unless the patch size divides the image."""
  h, w = image_hw
  if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
    raise ValueError(
        f'image size {h}x{w} does not work for Swin with patch_size {patch_size}: height and width '
        f'must be positive multiples of the patch size (e.g. '
        f'{max(patch_size, h // patch_size * patch_size)}x'
        f'{max(patch_size, w // patch_size * patch_size)})')
  grids = [(h // patch_size, w // patch_size)]
  for _ in range(num_stages - 1):
    grids.append(tuple(-(-g // 2) for g in grids[-1]))
  return grids


def relative_position_index(window: Union[int, Sequence[int]]) -> np.ndarray:
  """[N, N] int32 (N = wh*ww): the row of the bias table for query token i and key token j.

  Row = (dy + wh - 1) * (2*ww - 1) + (dx + ww - 1) for the offset (dy, dx) = pos_i - pos_j.
  """
  wh, ww = pair(window)
  yy, xx = np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')
  y, x = yy.reshape(-1), xx.reshape(-1)
  dy = y[:, None] - y[None, :] + wh - 1
  dx = x[:, None] - x[None, :] + ww - 1
  return (dy * (2 * ww - 1) + dx).astype(np.int32)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
                        ) -> Optional[np.ndarray]:
  """[num_windows, N, N] float32 additive mask (0 or MASK_VALUE) of the shifted windows, or None.

  After the cyclic shift by -shift, the last window along each axis holds tokens from both ends of
  the map. Each axis is split into [0, H-M), [H-M, H-s), [H-s, H) (H padded up to a multiple of M);
  tokens attend only to tokens of the same (row segment, column segment) region.
  """
  if not any(shift):
    return None
  hp, wp = (-(-g // w) * w for g, w in zip(grid, window))
  def segments(n, m, s):
    seg = np.zeros(n, np.int32)
    seg[n - m:n - s] = 1
    seg[n - s:] = 2
    return seg
  region = segments(hp, window[0], shift[0])[:, None] * 3 + segments(wp, window[1], shift[1])
  r = window_partition(region[None, :, :, None], window).reshape(-1, window[0] * window[1])
  return np.where(r[:, :, None] == r[:, None, :], 0.0, MASK_VALUE).astype(np.float32)


def window_partition(x, window: tuple[int, int]):
  """[B, H, W, C] -> [B * H/wh * W/ww, wh, ww, C], windows in row-major order per image."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wh, ww, c)


def window_reverse(windows: jax.Array, window: tuple[int, int], h: int, w: int) -> jax.Array:
  """Inverse of `window_partition`: [B * nW, wh, ww, C] -> [B, h, w, C]."""
  wh, ww = window
  c = windows.shape[-1]
  x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)
