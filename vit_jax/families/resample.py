"""Resampling learned position embeddings to a new patch grid ("high-resolution fine-tuning").

A learned `pos_embedding` is [1, prefix + gh*gw, D]: `prefix` rows for the class token (and any other
prefix tokens) followed by the patch grid in row-major order. When the image size changes (224 -> 384
at patch 16 turns a 14x14 grid into 24x24) only the grid part is resampled; prefix rows are kept as
they are.

Two methods:
  'bilinear': `scipy.ndimage.zoom(order=1)` on the [gh, gw, D] grid, exactly what Google's released
    fine-tuning results used (corner-aligned linear interpolation).
  'bicubic': antialiased bicubic with half-pixel centres (timm's default; matches
    `torch.nn.functional.interpolate(mode='bicubic', antialias=True)`), via `jax.image.resize`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
import scipy.ndimage

from vit_jax.shapes import hw

METHODS = ('bilinear', 'bicubic')


def square_grid(num_patches: int) -> tuple[int, int]:
  """(s, s) for a square grid of `num_patches` tokens; raises if the count is not a perfect square."""
  s = math.isqrt(num_patches)
  if s * s != num_patches:
    raise ValueError(
        f'cannot infer the patch grid of {num_patches} position embeddings: not a square; '
        'give the grid (or image size) explicitly')
  return s, s


def resample_grid(grid: np.ndarray, new_hw: Sequence[int], method: str = 'bilinear') -> np.ndarray:
  """Resamples a [gh, gw, D] grid to [new_h, new_w, D], in the grid's dtype (computed in float32+)."""
  if method not in METHODS:
    raise ValueError(f'posemb resize method {method!r} is not one of {METHODS}')
  new_h, new_w = (int(v) for v in new_hw)
  gh, gw, d = grid.shape
  if (gh, gw) == (new_h, new_w):
    return grid
  dtype = grid.dtype
  work = np.asarray(grid, np.float64 if dtype == np.float64 else np.float32)
  if method == 'bilinear':
    # Factors from the target shape: zoom rounds in * factor to get the output shape, and then
    # derives the sample positions from the shapes alone, so this is exactly Google's call.
    out = scipy.ndimage.zoom(work, (new_h / gh, new_w / gw, 1), order=1)
    if out.shape != (new_h, new_w, d):  # Rounding can only be off for absurd sizes; be loud.
      raise AssertionError(f'scipy.ndimage.zoom gave {out.shape}, wanted {(new_h, new_w, d)}')
  else:
    out = np.asarray(jax.image.resize(work, (new_h, new_w, d), method='bicubic', antialias=True))
  return out.astype(dtype)


def resample_posemb(posemb: np.ndarray, new_grid: Sequence[int], *, num_prefix: int,
                    old_grid: Optional[Sequence[int]] = None,
                    method: str = 'bilinear') -> np.ndarray:
  """Resamples the grid part of a [1, num_prefix + gh*gw, D] position embedding.

  Args:
    posemb: [1, N, D] (or [N, D]) learned position embeddings, prefix rows first.
    new_grid: target (gh', gw') in patches.
    num_prefix: rows before the grid (1 with a class token, else 0); they are copied unchanged.
    old_grid: the source (gh, gw); inferred as square from N - num_prefix when None.
    method: 'bilinear' (scipy.ndimage.zoom order=1, the default) or 'bicubic' (antialiased).

  Returns:
    [1, num_prefix + gh'*gw', D] in posemb's dtype; posemb itself when the grids are equal.
  """
  posemb = np.asarray(posemb)
  squeeze = posemb.ndim == 2
  pe = posemb[None] if squeeze else posemb
  if pe.ndim != 3 or pe.shape[0] != 1:
    raise ValueError(f'position embeddings must be [1, N, D], got {posemb.shape}')
  prefix, grid = pe[:, :num_prefix], pe[0, num_prefix:]
  old = tuple(old_grid) if old_grid is not None else square_grid(grid.shape[0])
  if old[0] * old[1] != grid.shape[0]:
    raise ValueError(f'position embeddings hold {grid.shape[0]} grid rows, not the {old[0]}x{old[1]} '
                     f'grid given (num_prefix={num_prefix}, shape {posemb.shape})')
  new = (int(new_grid[0]), int(new_grid[1]))
  if old == new:
    return posemb
  logging.info('resampling position embeddings %s grid %dx%d -> %dx%d (%s)', posemb.shape,
               *old, *new, method)
  grid = resample_grid(grid.reshape(old[0], old[1], -1), new, method)
  out = np.concatenate([prefix, grid.reshape(1, new[0] * new[1], -1)], axis=1)
  return out[0] if squeeze else out


# ---------- relative-position bias tables (Swin) ----------

# Relative-position bias tables (Swin): the position-embedding methods plus timm's own.
RELATIVE_RESIZE_METHODS = ('bicubic', 'bilinear', 'timm')


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
  """Where timm places the `src` source offsets among the `dst` target offsets: outward steps
  growing geometrically so that the outermost source offset lands at the target's edge (BEiT)."""
  half = src // 2
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q ** half) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  steps = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)]) if half else np.zeros(0)
  return np.concatenate([-steps[::-1], [0.0], steps])


def resize_relative_position_bias(table: np.ndarray, old_window: Any, new_window: Any,
                                  method: str = 'bicubic') -> np.ndarray:
  """Resamples a [(2*wh-1)*(2*ww-1), heads] relative position bias table to a new window.

  The table's rows are a (2*wh-1) x (2*ww-1) grid of offsets (dy, dx) in row-major order; each
  head's grid is resampled like an image.

  Args:
    table: [(2*wh-1)*(2*ww-1), heads].
    old_window, new_window: M or (wh, ww) of the table and of the result.
    method: 'bicubic' (antialiased, half-pixel centres: timm's `resize_rel_pos_bias_table_simple`
      and `vit_jax.families.resample`), 'bilinear' (corner-aligned linear, scipy zoom) or 'timm'
      (timm 1.0's default `resize_rel_pos_bias_table`, used by its Swin checkpoint filter and
      `set_input_size`: the old offsets spread geometrically over the new range, then linear
      interpolation with the edge values held beyond the outermost ones).

  Returns:
    [(2*wh'-1)*(2*ww'-1), heads] in the table's dtype; the table itself when the windows are equal.
  """
  if method not in RELATIVE_RESIZE_METHODS:
    raise ValueError(f'relative position bias resize method {method!r} is not one of '
                     f'{RELATIVE_RESIZE_METHODS}')
  table = np.asarray(table)
  (oh, ow), (nh, nw) = hw(old_window), hw(new_window)
  if table.ndim != 2 or table.shape[0] != (2 * oh - 1) * (2 * ow - 1):
    raise ValueError(f'a relative position bias table of window {(oh, ow)} must be '
                     f'[{(2 * oh - 1) * (2 * ow - 1)}, heads], got {table.shape}')
  if (oh, ow) == (nh, nw):
    return table
  heads = table.shape[1]
  grid = table.reshape(2 * oh - 1, 2 * ow - 1, heads)
  if method != 'timm':
    return resample_grid(grid, (2 * nh - 1, 2 * nw - 1), method).reshape(-1, heads)
  work = grid.astype(np.float64)
  for axis, (src, dst) in enumerate(((2 * oh - 1, 2 * nh - 1), (2 * ow - 1, 2 * nw - 1))):
    xp, x = _geometric_offsets(src, dst), np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    # Bilinear is separable; np.interp holds the edge values outside [xp[0], xp[-1]] as timm does.
    work = np.apply_along_axis(lambda v, x=x, xp=xp: np.interp(x, xp, v), axis, work)
  return work.reshape(-1, heads).astype(table.dtype)


def window_of_table(rows: int) -> int:
  """M of a square-window table with `rows` = (2M-1)^2 rows; ValueError otherwise."""
  side = math.isqrt(rows)
  if side * side != rows or side % 2 == 0:
    raise ValueError(f'{rows} relative position rows are not (2M-1)^2 for a square window M; '
                     'give the window size explicitly')
  return (side + 1) // 2
