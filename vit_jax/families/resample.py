"""Resampling learned position embeddings to a new patch grid ("high-resolution fine-tuning").

A learned `pos_embedding` is [1, prefix + gh*gw, D]: `prefix` rows for the class token (and any other
prefix tokens) followed by the patch grid in row-major order. When the image size changes (224 -> 384
at patch 16 turns a 14x14 grid into 24x24) only the grid part is resampled; prefix rows are kept as
they are.

Two methods (implemented in `vit_jax.models.resize`, which also applies them inside a jitted
function for a call at another image size, `dynamic_img_size`):
  'bilinear': `scipy.ndimage.zoom(order=1)` on the [gh, gw, D] grid, exactly what Google's released
    fine-tuning results used (corner-aligned linear interpolation).
  'bicubic': antialiased bicubic with half-pixel centres (timm's default; matches
    `torch.nn.functional.interpolate(mode='bicubic', antialias=True)`), via `jax.image.resize`.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

# The methods themselves live with the models, which also apply them inside a jitted function
# (`dynamic_img_size`); re-exported here, where checkpoint transfer has always found them.
from vit_jax.models.resize import (METHODS, RELATIVE_RESIZE_METHODS, resample_grid,
                                   resize_relative_position_bias, window_of_table)

__all__ = ['METHODS', 'RELATIVE_RESIZE_METHODS', 'resample_grid', 'resample_posemb',
           'resize_relative_position_bias', 'square_grid', 'window_of_table']


def square_grid(num_patches: int) -> tuple[int, int]:
  """(s, s) for a square grid of `num_patches` tokens; raises if the count is not a perfect square."""
  s = math.isqrt(num_patches)
  if s * s != num_patches:
    raise ValueError(
        f'cannot infer the patch grid of {num_patches} position embeddings: not a square; '
        'give the grid (or image size) explicitly')
  return s, s


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
