"""BEiT's relative position bias: one learned table per block, indexed by the offset of two patches.

A table for a gh x gw patch grid holds (2*gh-1)*(2*gw-1) rows of patch-to-patch offsets (dy, dx) in
row-major order, then three rows for the class token: class->patch, patch->class, class->class
(timm's `gen_relative_position_index`, Hugging Face's `BeitRelativePositionBias`). Each row holds
one logit bias per head. The index that turns a table into a [H, 1+N, 1+N] bias is a numpy
constant of the grid; nothing here is a parameter.

Resizing a table to another grid (a checkpoint moved to another resolution, or `dynamic_img_size`)
resizes its offset rows by `vit_jax.models.resize` (default 'timm': timm's
`resize_rel_pos_bias_table`, the old offsets spread over the new range with geometrically growing
steps, the BEiT authors' scheme): in numpy when a checkpoint moves (`vit_jax.families.beit`), as
that method's operator matrix inside a jitted call (`resize_table`); the class-token rows stay.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import resize

EXTRA_ROWS = 3  # class->patch, patch->class, class->class


def table_rows(grid: Sequence[int]) -> int:
  """Rows of the table of a (gh, gw) grid."""
  return (2 * int(grid[0]) - 1) * (2 * int(grid[1]) - 1) + EXTRA_ROWS


def grid_of_table(rows: int, posemb_grid: Optional[Sequence[int]] = None) -> tuple[int, int]:
  """The (gh, gw) grid a table of `rows` rows was made for: `posemb_grid` when given (checked), else
  square; a ValueError when neither fits."""
  if posemb_grid is not None:
    grid = (int(posemb_grid[0]), int(posemb_grid[1]))
    if table_rows(grid) != rows:
      raise ValueError(f'a relative position table of {rows} rows is not one of a {grid[0]}x'
                       f'{grid[1]} grid ({table_rows(grid)} rows)')
    return grid
  side = math.isqrt(rows - EXTRA_ROWS)
  if side * side != rows - EXTRA_ROWS or side % 2 == 0:
    raise ValueError(f'a relative position table of {rows} rows is not one of a square grid; set '
                     'the posemb_grid field to the grid it was made for')
  return (side + 1) // 2, (side + 1) // 2


@functools.lru_cache(maxsize=64)
def relative_index(grid: tuple[int, int]) -> np.ndarray:
  """[1+N, 1+N] int32 row of the table for each (query, key) pair; token 0 is the class token."""
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
  patch = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
  n = gh * gw
  top = (2 * gh - 1) * (2 * gw - 1)
  index = np.empty((n + 1, n + 1), np.int32)
  index[1:, 1:] = patch
  index[0, :] = top          # class -> patch
  index[:, 0] = top + 1      # patch -> class
  index[0, 0] = top + 2      # class -> class
  return index


def resize_table(table: jax.Array, old_grid: Sequence[int], new_grid: Sequence[int],
                 method: str = 'timm') -> jax.Array:
  """A [rows, H] table of `old_grid` -> the table of `new_grid` inside a jitted function (the
  class-token rows unchanged; the offsets by `vit_jax.models.resize`'s operator of `method`)."""
  old, new = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
  if old == new:
    return table
  offsets = resize.resize_relative_table(table[:-EXTRA_ROWS], old, new, method)
  return jnp.concatenate([offsets.astype(table.dtype), table[-EXTRA_ROWS:]], axis=0)


def relative_bias(table: jax.Array, grid: tuple[int, int], *, keep: Optional[jax.Array] = None,
                  num_prompts: int = 0) -> jax.Array:
  """The additive attention bias of a table made for `grid`: [1, H, T, T] (or [B, H, T, T] with
  `keep` [B, K], the kept patches' rows and columns), T = 1 + prompts + patches. Prompt tokens
  (after the class token) have no position: their rows and columns are zero."""
  index = relative_index(grid)
  bias = jnp.transpose(table[index], (2, 0, 1))[None]  # [1, H, 1+N, 1+N]
  if keep is not None:
    rows = jnp.concatenate([jnp.zeros((keep.shape[0], 1), jnp.int32), keep.astype(jnp.int32) + 1],
                           axis=1)  # [B, 1+K]
    bias = jnp.take_along_axis(bias, rows[:, None, :, None], axis=2)
    bias = jnp.take_along_axis(bias, rows[:, None, None, :], axis=3)
  if num_prompts:
    body = jnp.pad(bias[:, :, 1:, 1:], ((0, 0), (0, 0), (num_prompts, 0), (num_prompts, 0)))
    top = jnp.pad(bias[:, :, :1, 1:], ((0, 0), (0, 0), (0, 0), (num_prompts, 0)))
    left = jnp.pad(bias[:, :, 1:, :1], ((0, 0), (0, 0), (num_prompts, 0), (0, 0)))
    bias = jnp.concatenate([jnp.concatenate([bias[:, :, :1, :1], top], axis=3),
                            jnp.concatenate([left, body], axis=3)], axis=2)
  return bias
