"""The backbone API the families share (issue M §3): intermediate token maps out of a model call.

    out = model.apply(variables, images, intermediates=(i, j, ...), norm=False, drop_prefix=False)
    out['maps']    list, one per index in the order given: [B, H_i, W_i, D_i] token maps
    out['prefix']  list, one per index: [B, P, D_i] prefix tokens (class, distillation, registers;
                   P = 0 for families that have none); absent with drop_prefix=True

What an index counts is the family's (`Family.intermediate_unit`): blocks of a plain ViT or a Mixer,
stages of a hierarchical model (Swin, PVT). Indices may be negative (from the end), as in timm's
`forward_intermediates(indices=[...])`; an int n alone means the last n, as there. timm returns its
list in depth order: for ascending indices without repeats the two lists are equal. `norm=True`
applies the model's final norm where timm's `norm=True` does (each family's docstring says where).
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

Indices = Union[int, Sequence[int]]


def take_indices(indices: Indices, count: int, unit: str = 'blocks') -> list[int]:
  """Absolute indices in [0, count) for `indices` (ints, negatives from the end; an int n: the last
  n, timm's convention); a ValueError naming the valid range otherwise."""
  if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices,
                                                                                         str):
    raise ValueError(f'intermediates must be a sequence of {unit} indices (or an int n for the '
                     f'last n), got {indices!r}')
  if isinstance(indices, int):
    if not 0 < indices <= count:
      raise ValueError(f'intermediates={indices} asks for the last {indices} {unit}, but the model '
                       f'has {count}')
    return list(range(count - indices, count))
  out = []
  for i in indices:
    if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
      raise ValueError(f'intermediate index {i!r} is out of range: the model has {count} {unit} '
                       f'(indices {-count}..{count - 1}, negatives count from the end)')
    out.append(i % count)
  if not out:
    raise ValueError(f'intermediates is empty: give at least one of the {count} {unit}')
  return out


def pack(maps: Sequence[jax.Array], prefix: Sequence[jax.Array], drop_prefix: bool) -> dict:
  """The returned dict: {'maps': [...]} plus {'prefix': [...]} unless drop_prefix."""
  out = {'maps': list(maps)}
  if not drop_prefix:
    out['prefix'] = list(prefix)
  return out


def no_prefix(token_map: jax.Array) -> jax.Array:
  """[B, 0, D]: the prefix tokens of a family that has none (the API's shape stays uniform)."""
  return jnp.zeros((token_map.shape[0], 0, token_map.shape[-1]), token_map.dtype)
