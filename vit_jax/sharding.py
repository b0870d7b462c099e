"""Device mesh from the config, and the rules that give every parameter a PartitionSpec.

The mesh has three named axes (any may have size 1):
  data    pure data parallelism: parameters replicated, the batch split;
  fsdp    fully-sharded data parallelism (ZeRO-3): the batch split further, and every large parameter
          (and its optimizer moments) sharded along its largest divisible dimension (big_vision's rule);
  tensor  Megatron-style tensor parallelism: attention heads and MLP hidden units split.
The batch dimension of inputs is sharded over ('data', 'fsdp'). Rules match parameter paths with
regular expressions, so optimizer moments (whose paths end in the parameter path) follow their
parameter. The tensor rules are the model family's (`Family.tensor_rules`): this module names no
parameter.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

def mesh_shape(mesh_spec: Sequence[Sequence[Any]], num_devices: int) -> dict[str, int]:
  """Resolves (('data', -1), ('fsdp', 2), ...) against the device count; -1 takes what is left."""
  names = [str(n) for n, _ in mesh_spec]
  bad = sorted(set(names) - set(AXES))
  if bad or len(set(names)) != len(names):
    raise ValueError(f'mesh axes {names} must be distinct names from {AXES}')
  sizes = [int(s) for _, s in mesh_spec]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {list(mesh_spec)}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not divide into mesh {list(mesh_spec)}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  shape = {a: 1 for a in AXES}
  shape.update(zip(names, sizes))
  return shape


def make_mesh(mesh_spec: Sequence[Sequence[Any]] = (('data', -1),),
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') over all (global) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_spec, len(devices))
  dims = tuple(shape[a] for a in AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # Some platforms (CPU, odd counts) have no topology-aware layout.
    grid = np.array(devices).reshape(dims)
  return Mesh(grid, AXES)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


Rules = Sequence[tuple[str, tuple]]


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int,
              tensor_rules: Rules) -> P:
  axis_size = dict(mesh.shape)  # Mesh or AbstractMesh: the rules need only the axis sizes
  spec: list[Any] = [None] * len(shape)
  if axis_size.get('tensor', 1) > 1:
    for pattern, rule in tensor_rules:
      if re.search(pattern, path):
        offset = len(shape) - len(rule)  # a leading [layers] axis when blocks are scanned
        if offset < 0:
          break
        for i, ax in enumerate(rule):
          if ax and shape[offset + i] % axis_size['tensor'] == 0:
            spec[offset + i] = ax
          elif ax:
            logging.warning('%s: dim %d of %s is not divisible by tensor=%d; replicated',
                            path, offset + i, shape, axis_size['tensor'])
        break
  n = axis_size.get('fsdp', 1)
  if n > 1 and math.prod(shape) >= fsdp_min_size:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n == 0]
    if free:
      # Largest divisible dimension; ties go to the last one, which keeps a scanned [layers] axis
      # whole.
      best = max(free, key=lambda i: (shape[i], i))
      spec[best] = 'fsdp'
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int = 2 ** 14,
                   tensor_rules: Rules = ()) -> Any:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (parameters, optimizer state, ...).

  tensor_rules: the model family's (path regex, spec) pairs. Scalars and small leaves are
  replicated; see the module docstring for the rules.
  """
  def one(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, _spec_for(_path_str(path), shape, mesh, fsdp_min_size, tensor_rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(shardings: Any) -> dict[str, str]:
  """{parameter path: spec} for logging and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {_path_str(path): str(s.spec) for path, s in flat}
