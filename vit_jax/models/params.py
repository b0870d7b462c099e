"""Parameter-tree helpers every family shares: flatten to '/'-joined paths, unflatten, count.

Layout conversions that know parameter names (the ViT's scanned blocks) live in the family's
descriptor (`vit_jax.families.vit.stack_blocks` / `unstack_blocks`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

Params = dict[str, Any]


def flatten(params: Params, sep: str = '/') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}, keys sorted as in the tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[sep.join(str(getattr(k, 'key', k)) for k in path)] = leaf
  return out


def flatten_numpy(params: Params) -> dict[str, np.ndarray]:
  """`flatten` with every leaf as a host numpy array (what checkpoint writers and readers hold)."""
  return {k: np.asarray(v) for k, v in flatten(params).items()}


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
