"""Conversions between the scanned and unscanned parameter layouts of `VisionTransformer`.

Unscanned (Google's released layout): `Transformer/encoderblock_{i}/...` for i in [0, L).
Scanned (`scan=True`, big_vision's layout): `Transformer/encoderblock/...` with a leading [L] axis.
Both functions take and return nested dicts of arrays (a `params` collection, without the
'params' key) and leave every other entry untouched.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

Params = dict[str, Any]
_BLOCK = re.compile(r'^encoderblock_(\d+)$')


def is_scanned(params: Params) -> bool:
  """True if the tree holds one stacked `Transformer/encoderblock`."""
  return 'encoderblock' in params.get('Transformer', {})


def unstack_blocks(params: Params) -> Params:
  """Scanned -> unscanned: splits `Transformer/encoderblock` into `encoderblock_{i}`."""
  if not is_scanned(params):
    return params
  enc = dict(params['Transformer'])
  stacked = enc.pop('encoderblock')
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    enc[f'encoderblock_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, 'Transformer': enc}


def stack_blocks(params: Params) -> Params:
  """Unscanned -> scanned: stacks `encoderblock_{0..L-1}` into `Transformer/encoderblock`."""
  enc = dict(params.get('Transformer', {}))
  indices = sorted(int(m.group(1)) for k in enc if (m := _BLOCK.match(k)))
  if not indices:
    return params
  if indices != list(range(len(indices))):
    raise ValueError(f'encoder blocks are not numbered 0..{len(indices) - 1}: {indices}')
  blocks = [enc.pop(f'encoderblock_{i}') for i in indices]
  stack = np.stack if isinstance(jax.tree.leaves(blocks[0])[0], np.ndarray) else jax.numpy.stack
  enc['encoderblock'] = jax.tree.map(lambda *xs: stack(xs), *blocks)
  return {**params, 'Transformer': enc}


def flatten(params: Params, sep: str = '/') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}, keys sorted as in the tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[sep.join(str(getattr(k, 'key', k)) for k in path)] = leaf
  return out


def unflatten(flat: dict[str, Any], sep: str = '/') -> Params:
  """Inverse of `flatten`."""
  tree: Params = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def count(params: Any) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))
