"""Float comparisons whose tolerance scales with the values compared.

float32 keeps about 7 significant digits (eps = 1.19e-7), and XLA may sum in a different order on
another CPU (vector width, thread split). A sum of n terms then differs by up to ~n * eps relative to
the largest term, so a fixed absolute tolerance fails on large values (gradients of size 50) and
passes anything on tiny ones. These helpers compare |a - b| against `rtol` times the largest
magnitude in the reference array, which is what such rounding bounds.
"""
from __future__ import annotations

import numpy as np


def assert_close_to_scale(actual, expected, rtol: float = 1e-5, what: str = '') -> None:
  """|actual - expected| <= rtol * max|expected| elementwise (and shapes equal)."""
  a = np.asarray(actual, np.float64)
  b = np.asarray(expected, np.float64)
  assert a.shape == b.shape, f'{what}: shapes differ: {a.shape} vs {b.shape}'
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  err = float(np.max(np.abs(a - b))) if b.size else 0.0
  assert err <= rtol * max(scale, 1e-30), (
      f'{what}: max |diff| {err:.3g} exceeds {rtol:g} x scale {scale:.3g}')


def assert_trees_close_to_scale(actual, expected, rtol: float = 1e-5) -> None:
  """Leaf by leaf, |actual - expected| <= rtol * the largest magnitude in the whole `expected` tree.

  The scale is the tree's, not each leaf's: in a backward pass rounding flows from the largest
  values into every leaf, and some leaves are exactly zero in exact arithmetic (a key bias's gradient:
  softmax ignores a constant shift), so their own scale is rounding noise.
  """
  import jax  # pylint: disable=import-outside-toplevel
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_b = jax.tree_util.tree_leaves(expected)
  assert len(flat_a) == len(flat_b), 'trees differ in structure'
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in flat_b if np.size(b))
  for (path, a), b in zip(flat_a, flat_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f'{jax.tree_util.keystr(path)}: shapes differ'
    err = float(np.max(np.abs(a - b))) if b.size else 0.0
    assert err <= rtol * scale, (f'{jax.tree_util.keystr(path)}: max |diff| {err:.3g} exceeds '
                                 f'{rtol:g} x tree scale {scale:.3g}')


# The README's figure for logits against timm / Hugging Face / an independent reference: an absolute
# 1e-4. It is kept absolute (the issue states it so) and made meaningful by the logits' size.
LOGIT_BOUND = 1e-4


def assert_logits_match(actual, expected, bound: float = LOGIT_BOUND, what: str = '') -> float:
  """max |actual - expected| <= bound (absolute) on logits of size O(1): 0.05 <= max |expected| <= 30.

  O(1) logits make the absolute bound a relative one of 2e-3 to 3e-6: vanishing logits would pass
  anything, and large ones would fail on float32 rounding (~n eps of their size). Returns the
  difference (for reports)."""
  a = np.asarray(actual, np.float64)
  b = np.asarray(expected, np.float64)
  assert a.shape == b.shape, f'{what}: shapes differ: {a.shape} vs {b.shape}'
  scale = float(np.max(np.abs(b)))
  assert 0.05 <= scale <= 30, f'{what}: logits of size {scale:.3g} are not O(1); rescale the test model'
  err = float(np.max(np.abs(a - b)))
  assert err <= bound, f'{what}: max |logit diff| {err:.3g} exceeds {bound:g} (logits of size {scale:.3g})'
  return err
