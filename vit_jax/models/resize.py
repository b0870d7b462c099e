"""Resampling of resolution-dependent tables: grids of vectors and relative-position bias tables.

One implementation serves both moments a table changes size:
  - checkpoint transfer (`vit_jax.families.resample`, numpy, before training or inference), and
  - a call at another image size (`dynamic_img_size`), inside the jitted function, where the table
    is a traced parameter. Every method here is linear in the table, so the in-jit form applies the
    operator matrix of the same numpy method (`grid_operator`, `relative_operator`: the method run
    on an identity basis, computed once per shape at trace time) with one matmul. The two forms
    agree to float32 rounding, and the gradient flows to the stored table.

Grid methods ([gh, gw, D] -> [gh', gw', D]):
  'bilinear': `scipy.ndimage.zoom(order=1)`, corner-aligned linear (Google's fine-tuning).
  'bicubic': antialiased bicubic with half-pixel centres (timm's default; matches
    `torch.nn.functional.interpolate(mode='bicubic', antialias=True)`), via `jax.image.resize`.
  'linear': linear with half-pixel centres and no antialiasing
    (`tf.image.resize(method='bilinear')`, `torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False)`): FlexiViT's resize, and the one timm's loaders of Google's `.npz` and
    of FlexiViT apply to kernels and tables.
Relative-position bias tables ([(2wh-1)(2ww-1), heads], Swin) take those plus 'timm' (timm 1.0's
`resize_rel_pos_bias_table`).

Patch-embedding kernels ([ph, pw, C, D] -> [ph', pw', C, D]) are resampled by FlexiViT's PI-resize
(Beyer et al., 2023, "FlexiViT: One Model for All Patch Sizes"): a token is <x, w> for a patch x
and a kernel w; resizing the patch with a linear method B (x' = B x) and the kernel with
w' = pinv(B^T) w keeps <B x, w'> = <x, w> for every x when the patch grows (B has full column
rank), and is the least-squares best when it shrinks. `pi_resize_kernel` (numpy, checkpoint
transfer) and `pi_resize_kernel_jax` (inside a jitted call) apply the same [ph'*pw', ph*pw]
operator (`pi_resize_operator`), B being any grid method above ('linear': FlexiViT's and timm's
FlexiViT loader; 'bicubic': timm's `resample_patch_embed` default).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bilinear', 'bicubic', 'linear')
RELATIVE_RESIZE_METHODS = ('bicubic', 'bilinear', 'timm')

Window = Union[int, Sequence[int]]


def _pair(x: Window) -> tuple[int, int]:
  return (int(x), int(x)) if np.ndim(x) == 0 else (int(x[0]), int(x[1]))


def resample_grid(grid: np.ndarray, new_hw: Sequence[int], method: str = 'bilinear') -> np.ndarray:
  """Resamples a [gh, gw, D] grid to [new_h, new_w, D] in its dtype (computed in float32+)."""
  if method not in METHODS:
    raise ValueError(f'posemb resize method {method!r} is not one of {METHODS}')
  new_h, new_w = (int(v) for v in new_hw)
  gh, gw, d = grid.shape
  if (gh, gw) == (new_h, new_w):
    return grid
  dtype = grid.dtype
  work = np.asarray(grid, np.float64 if dtype == np.float64 else np.float32)
  if method == 'linear':
    # Separable: one [new, old] interpolation matrix per axis, exact in float64.
    out = np.einsum('ih,jw,hwd->ijd', _linear_matrix(gh, new_h), _linear_matrix(gw, new_w),
                    work.astype(np.float64))
  elif method == 'bilinear':
    import scipy.ndimage  # pylint: disable=import-outside-toplevel
    # Factors from the target shape: zoom rounds in * factor to get the output shape, and then
    # derives the sample positions from the shapes alone, so this is exactly Google's call.
    out = scipy.ndimage.zoom(work, (new_h / gh, new_w / gw, 1), order=1)
    if out.shape != (new_h, new_w, d):  # Rounding can only be off for absurd sizes; be loud.
      raise AssertionError(f'scipy.ndimage.zoom gave {out.shape}, wanted {(new_h, new_w, d)}')
  else:
    # Concrete even when called while a jitted function is traced (the in-jit operators).
    with jax.ensure_compile_time_eval():
      out = np.asarray(jax.image.resize(work, (new_h, new_w, d), method='bicubic', antialias=True))
  return out.astype(dtype)


def _linear_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] float64 weights of half-pixel-centred linear interpolation without antialiasing:
  output i samples the input at (i + 0.5) * old / new - 0.5, clamped at the first pixel (as
  torch's and TensorFlow's kernels do), between its two neighbours."""
  out = np.zeros((new, old), np.float64)
  src = np.maximum((np.arange(new) + 0.5) * (old / new) - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(int), old - 1)
  high = np.minimum(low + 1, old - 1)
  frac = src - low
  np.add.at(out, (np.arange(new), low), 1.0 - frac)
  np.add.at(out, (np.arange(new), high), frac)
  return out


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
    method: 'bicubic' (antialiased, half-pixel centres: timm's `resize_rel_pos_bias_table_simple`),
      'bilinear' (corner-aligned linear, scipy zoom) or 'timm' (timm 1.0's default
      `resize_rel_pos_bias_table`, used by its Swin checkpoint filter and `set_input_size`: the old
      offsets spread geometrically over the new range, then linear interpolation with the edge
      values held beyond the outermost ones).

  Returns:
    [(2*wh'-1)*(2*ww'-1), heads] in the table's dtype; the table itself when the windows are equal.
  """
  if method not in RELATIVE_RESIZE_METHODS:
    raise ValueError(f'relative position bias resize method {method!r} is not one of '
                     f'{RELATIVE_RESIZE_METHODS}')
  table = np.asarray(table)
  (oh, ow), (nh, nw) = _pair(old_window), _pair(new_window)
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


# ---------- the same methods as operators, for use inside a jitted function ----------

@functools.lru_cache(maxsize=None)
def grid_operator(old_hw: tuple[int, int], new_hw: tuple[int, int], method: str) -> np.ndarray:
  """[h'*w', h*w] float32 matrix A with resample_grid(g, new_hw, method) == A @ g (flattened)."""
  n = old_hw[0] * old_hw[1]
  basis = np.eye(n, dtype=np.float32).reshape(old_hw[0], old_hw[1], n)
  return np.ascontiguousarray(resample_grid(basis, new_hw, method).reshape(-1, n))


@functools.lru_cache(maxsize=None)
def relative_operator(old_window: tuple[int, int], new_window: tuple[int, int], method: str
                      ) -> np.ndarray:
  """[R', R] float32 matrix A with resize_relative_position_bias(t, old, new, method) == A @ t."""
  rows = (2 * old_window[0] - 1) * (2 * old_window[1] - 1)
  return np.ascontiguousarray(resize_relative_position_bias(
      np.eye(rows, dtype=np.float32), old_window, new_window, method))


def resize_relative_table(table: jax.Array, old_window: Window, new_window: Window,
                          method: str = 'bicubic') -> jax.Array:
  """`resize_relative_position_bias` on a traced [(2wh-1)(2ww-1), heads] table (float32 result)."""
  old, new = _pair(old_window), _pair(new_window)
  rows = (2 * old[0] - 1) * (2 * old[1] - 1)
  if table.shape[0] != rows:
    raise ValueError(f'a relative position bias table of window {old} must be [{rows}, heads], '
                     f'got {tuple(table.shape)}')
  if old == new:
    return table
  if method not in RELATIVE_RESIZE_METHODS:
    raise ValueError(f'relative position bias resize method {method!r} is not one of '
                     f'{RELATIVE_RESIZE_METHODS}')
  op = jnp.asarray(relative_operator(old, new, method))
  return jnp.matmul(op, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


# ---------- FlexiViT's PI-resize of a patch-embedding kernel ----------

@functools.lru_cache(maxsize=None)
def pi_resize_operator(old_hw: tuple[int, int], new_hw: tuple[int, int], method: str = 'linear'
                       ) -> np.ndarray:
  """[h'*w', h*w] float32 matrix P = pinv(B^T) with B = grid_operator(old_hw, new_hw, method), the
  resize of a patch: a kernel's [h*w] spatial values w (per input and output channel) become P @ w
  (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f'patch-embedding resize method {method!r} is not one of {METHODS}')
  old, new = _pair(old_hw), _pair(new_hw)
  resize = grid_operator(old, new, method).astype(np.float64)  # [h'*w', h*w]
  # Singular values below float32 resolution are the operator's rounding, not signal: cut them as
  # torch.linalg.pinv does in float32 (timm), else a rank-deficient B (a shrink) blows up.
  rcond = max(resize.shape) * np.finfo(np.float32).eps
  return np.ascontiguousarray(np.linalg.pinv(resize.T, rcond=rcond).astype(np.float32))


def patch_method(method: str) -> str:
  """The PI-resize method that goes with a table resize `method`: a patch is resized as images are,
  half-pixel centred: 'bicubic' (antialiased; timm's `resample_patch_embed` default) when the tables
  are, else 'linear' (FlexiViT's; 'bilinear' is the tables' corner-aligned legacy, not an image
  resize)."""
  if method not in METHODS:
    raise ValueError(f'resize method {method!r} is not one of {METHODS}')
  return 'bicubic' if method == 'bicubic' else 'linear'


def _check_kernel(shape: Sequence[int], new_hw: Window) -> tuple[tuple[int, int], tuple[int, int]]:
  if len(shape) != 4:
    raise ValueError(f'a patch-embedding kernel is [ph, pw, C, D], got shape {tuple(shape)}')
  return (int(shape[0]), int(shape[1])), _pair(new_hw)


def pi_resize_kernel(kernel: np.ndarray, new_hw: Window, method: str = 'linear') -> np.ndarray:
  """FlexiViT's PI-resize of a [ph, pw, C, D] patch-embedding kernel to [ph', pw', C, D] (its dtype;
  computed in float64 from the float32 operator); the kernel itself when the sizes are equal."""
  kernel = np.asarray(kernel)
  old, new = _check_kernel(kernel.shape, new_hw)
  if old == new:
    return kernel
  op = pi_resize_operator(old, new, method).astype(np.float64)
  flat = kernel.astype(np.float64).reshape(old[0] * old[1], -1)
  return (op @ flat).reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)


def pi_resize_kernel_jax(kernel: jax.Array, new_hw: Window, method: str = 'linear') -> jax.Array:
  """`pi_resize_kernel` on a traced kernel, inside a jitted function: one matmul with the operator
  (built once per shape at trace time); float32 result, gradients reach the stored kernel."""
  old, new = _check_kernel(kernel.shape, new_hw)
  if old == new:
    return kernel
  op = jnp.asarray(pi_resize_operator(old, new, method))
  flat = kernel.astype(jnp.float32).reshape(old[0] * old[1], -1)
  out = jnp.matmul(op, flat, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(*new, *kernel.shape[2:])
