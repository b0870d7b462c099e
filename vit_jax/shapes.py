"""Shape helpers that both `vit_jax.data` and `vit_jax.families` need: a leaf module (numpy only).

It sits below both packages so that data/ imports nothing from families/ (tests/test_layering.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def hw(value: Any) -> tuple[int, int]:
  """An int or an (h, w) pair (tuple, list, array) -> (h, w) ints. The one place this is spelled."""
  if np.ndim(value) == 0:
    return int(value), int(value)
  value = [int(v) for v in value]
  if len(value) != 2:
    raise ValueError(f'expected an int or an (h, w) pair, got {value}')
  return value[0], value[1]
