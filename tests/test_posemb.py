"""Position-embedding resampling: Google's scipy zoom exactly, prefix rows kept, non-square grids."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from tests import interop
from vit_jax.families.resample import resample_grid, resample_posemb, square_grid


def _posemb(prefix, gh, gw, d=8, seed=0):
  return np.random.RandomState(seed).normal(size=(1, prefix + gh * gw, d)).astype(np.float32)


def test_bilinear_equals_scipy_zoom_as_google_called_it():
  """224 -> 384 at patch 16: 14x14 -> 24x24, as vit_jax/checkpoint.py's interpolate_posembed."""
  pe = _posemb(1, 14, 14, d=16)
  out = resample_posemb(pe, (24, 24), num_prefix=1)
  grid = pe[0, 1:].reshape(14, 14, -1)
  want = scipy.ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1).reshape(1, 24 * 24, -1)
  assert out.shape == (1, 1 + 576, 16) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 1:], want)
  np.testing.assert_array_equal(out[:, :1], pe[:, :1])  # The class token is untouched.


def test_identity_at_equal_size():
  pe = _posemb(1, 7, 5)
  assert resample_posemb(pe, (7, 5), num_prefix=1, old_grid=(7, 5)) is pe
  for method in ('bilinear', 'bicubic'):
    np.testing.assert_array_equal(resample_grid(pe[0, 1:].reshape(7, 5, -1), (7, 5), method),
                                  pe[0, 1:].reshape(7, 5, -1))


@pytest.mark.parametrize('prefix', [0, 1, 2])
def test_non_square_both_ways_keeps_prefix_rows(prefix):
  pe = _posemb(prefix, 14, 14)
  wide = resample_posemb(pe, (16, 24), num_prefix=prefix)
  assert wide.shape == (1, prefix + 16 * 24, 8)
  np.testing.assert_array_equal(wide[:, :prefix], pe[:, :prefix])
  want = scipy.ndimage.zoom(pe[0, prefix:].reshape(14, 14, 8), (16 / 14, 24 / 14, 1), order=1)
  np.testing.assert_array_equal(wide[0, prefix:].reshape(16, 24, 8), want)
  back = resample_posemb(wide, (14, 14), num_prefix=prefix, old_grid=(16, 24))
  assert back.shape == pe.shape
  np.testing.assert_array_equal(back[:, :prefix], pe[:, :prefix])
  # Linear interpolation reproduces a linear ramp exactly, whatever the grids.
  ramp = np.add.outer(np.linspace(0, 1, 14), np.linspace(0, 2, 14))[..., None].astype(np.float32)
  up = resample_grid(ramp, (16, 24))
  np.testing.assert_allclose(up[..., 0], np.add.outer(np.linspace(0, 1, 16), np.linspace(0, 2, 24)),
                             atol=1e-6)


def test_corners_are_kept_by_bilinear():
  grid = _posemb(0, 3, 4)[0].reshape(3, 4, -1)
  out = resample_grid(grid, (7, 9))
  for (i, j), (y, x) in {(0, 0): (0, 0), (0, 3): (0, 8), (2, 0): (6, 0), (2, 3): (6, 8)}.items():
    np.testing.assert_allclose(out[y, x], grid[i, j], rtol=1e-6)


def test_bicubic_matches_torch_antialiased_interpolate():
  torch = interop.require('torch')
  grid = _posemb(0, 14, 14, d=4)[0].reshape(14, 14, 4)
  for new in ((24, 24), (16, 24), (7, 10)):  # Up, non-square, and down (where antialias matters).
    ours = resample_grid(grid, new, 'bicubic')
    t = torch.from_numpy(grid.transpose(2, 0, 1)[None].copy())
    want = torch.nn.functional.interpolate(t, size=new, mode='bicubic', antialias=True,
                                           align_corners=False)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, want, atol=1e-5)


def test_bfloat16_and_unknown_method():
  import ml_dtypes
  pe = _posemb(1, 4, 4).astype(ml_dtypes.bfloat16)
  assert resample_posemb(pe, (6, 6), num_prefix=1).dtype == ml_dtypes.bfloat16
  with pytest.raises(ValueError, match="'nearest' is not one of"):
    resample_posemb(_posemb(1, 4, 4), (6, 6), num_prefix=1, method='nearest')


def test_grid_errors_are_clear():
  with pytest.raises(ValueError, match='not a square'):
    square_grid(12)
  with pytest.raises(ValueError, match='not the 3x3 grid'):
    resample_posemb(_posemb(1, 4, 4), (6, 6), num_prefix=1, old_grid=(3, 3))
