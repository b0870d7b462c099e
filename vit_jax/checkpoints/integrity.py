"""A fingerprint of a checkpoint's arrays, saved with it and checked when it is read back.

Orbax stores arrays compressed, without checksums: a flipped bit in a data file can restore as
silently wrong numbers. `seal` adds to a checkpoint's metadata, at save time, [number of arrays,
S, W] over every array's bits read as unsigned words w_i (32-bit; 16- and 8-bit types widened;
64-bit split in two): S = sum(w_i), W = sum((i + 1) w_i), both mod 2^32, i the row-major index,
summed over arrays. Integer sums mod 2^32 are exact in any order, so the figure is the same on the
accelerator (computed where the sharded arrays live, in one jitted reduction: no gather to a host),
on the host with NumPy, and for any mesh. Any single flipped bit changes S; `check` refuses a
checkpoint whose arrays no longer match, and the manager then falls back to the step before it.
Checkpoints written before this existed carry no fingerprint and are read unchecked.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

KEY = 'integrity'
_MASK = (1 << 32) - 1


def _np_words(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  words = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  return x.view(words).astype(np.uint64)


def _np_sums(x: np.ndarray) -> tuple[int, int]:
  w = _np_words(x)
  index = (np.arange(1, w.size + 1, dtype=np.uint64) & np.uint64(_MASK))
  return int(w.sum() & np.uint64(_MASK)), int((index * w).sum() & np.uint64(_MASK))


def _jax_words(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return lax.bitcast_convert_type(x, words).astype(jnp.uint32)  # 8 bytes: a trailing [2] axis


def _jax_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  w = _jax_words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):  # the row-major index, mod 2^32, without a reshape
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride & _MASK)
    stride *= w.shape[d]
  return jnp.sum(w, dtype=jnp.uint32), jnp.sum((index + jnp.uint32(1)) * w, dtype=jnp.uint32)


# One program for the whole tree (compiled once per run: the state's structure does not change).
# Not one per leaf: hundreds of small sharded programs in flight at once, each with its own
# all-reduce, can leave XLA:CPU's in-process collectives waiting on threads busy with the others
# until its 40 s rendezvous timeout aborts the process (seen with 8 fake devices on 2 cores).
_jax_tree_sums = jax.jit(lambda leaves: [_jax_sums(x) for x in leaves])


def fingerprint(tree: Any) -> list[int]:
  """[arrays, S, W] of a pytree of jax.Arrays (sharded or not) and/or NumPy arrays."""
  leaves = [x for x in jax.tree.leaves(tree) if x is not None]
  on_device = [x for x in leaves if isinstance(x, jax.Array)]
  sums = [_np_sums(np.asarray(x)) for x in leaves if not isinstance(x, jax.Array)]
  if on_device:
    sums += [(int(s), int(w)) for s, w in jax.device_get(_jax_tree_sums(on_device))]
  return [len(leaves), sum(s for s, _ in sums) & _MASK, sum(w for _, w in sums) & _MASK]


def _json_digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def seal(meta: dict, state: Any, data_state: Optional[dict] = None) -> dict:
  """`meta` with the fingerprint of `state` (and a digest of the data pipeline's state) added."""
  record = {'state': fingerprint(state)}
  if data_state is not None:
    record['data'] = _json_digest(data_state)
  return {**meta, KEY: record}


def check(where: str, meta: dict, state: Any, data_state: Optional[dict] = None) -> None:
  """Raises ValueError naming `where` when the arrays (or data state) read back do not match the
  fingerprint saved with them; checkpoints without one pass unchecked."""
  record = (meta or {}).get(KEY)
  if not record:
    return
  got = fingerprint(state)
  if got != list(record['state']):
    what = ('a different number of arrays' if got[0] != record['state'][0] else
            'different bits')
    raise ValueError(f'{where} is corrupted: its arrays read back as {what} than were saved '
                     f'(fingerprint {got} != {list(record["state"])})')
  if data_state is not None and 'data' in record and _json_digest(data_state) != record['data']:
    raise ValueError(f'{where} is corrupted: its data-pipeline state differs from the one saved')
