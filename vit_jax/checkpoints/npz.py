"""Google's released `.npz` files, both layouts, to and from this project's flat parameter dict.

A flat dict maps '/'-joined paths of a family's file layout (the unscanned tree) to numpy arrays
(`vit_jax.models.params.flatten`). google-research/vision_transformer's ViT, hybrid and Mixer files
hold exactly those names. For the ViT, two layouts exist on disk:

  vit_jax (google-research/vision_transformer; what timm's `.npz` loader reads): exactly this
    project's names: `Transformer/posembed_input/pos_embedding` [1, prefix + gh*gw, D] with the
    class-token row, blocks `encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3}`. Old training checkpoints carry an `opt/target/` prefix.
  big_vision: a `params/` prefix (`params/img/` in two-tower models), a top-level `pos_embedding`
    [1, gh*gw, D] added *before* the class token is prepended (so the class token has no position
    embedding: its row becomes zeros here), blocks `encoderblock_{i}/{LayerNorm_0,
    MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}` or one scanned `encoderblock` with a
    leading [depth] axis, and `MAPHead_0` for attention pooling.

Files are always read with `allow_pickle=False`. A damaged file is a ValueError naming it and what
is wrong: truncated or not a zip archive, a member whose CRC-32 fails (every member is checked
before any is used, so a flipped bit anywhere, even one that would still parse, is caught), an
array that does not parse, or parameters that are not floating point.
"""
from __future__ import annotations

import io
import math
import os
import re
from typing import Any, Mapping
import zipfile

import numpy as np

Flat = dict[str, np.ndarray]

LAYOUTS = ('vit_jax', 'big_vision')
_PREFIXES = ('opt/target/', 'params/img/', 'params/')
# big_vision block module names -> this project's (Google's vit_jax) names.
_BV_BLOCK = {'LayerNorm_0': 'LayerNorm_0',
             'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
             'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
# The input layers of Google's families (ViT and hybrid patch embedding, hybrid root, Mixer stem).
_STEMS = ('embedding/kernel', 'conv_root/kernel', 'stem/kernel')
_MAP_MODULES = ('probe', 'MlpBlock_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_0')
_BLOCK_KEY = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)/(.*)$')
_SCANNED_KEY = re.compile(r'^Transformer/encoderblock/([^/]+)/(.*)$')


def load_npz(path: str | os.PathLike) -> Flat:
  """Every array of an `.npz` file, by its key (allow_pickle=False; CRC-32s checked first)."""
  with open(path, 'rb') as f:
    data = f.read()  # Reading whole keeps this working for any file-like path wrapper.
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      bad = archive.testzip()
    if bad is not None:
      raise ValueError(f'{path}: array {bad!r} fails its CRC-32 check: the file is corrupted; '
                       f'copy or download it again')
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {k: np.asarray(npz[k]) for k in npz.files}
  except Exception as e:  # BadZipFile, EOFError, ValueError, tokenize errors of a bad header, ...
    if str(path) in str(e):
      raise
    raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}: {e}). It is '
                     f'truncated, corrupted, holds pickled objects (never loaded), or is not an '
                     f'.npz') from e


def check_dtypes(flat: Mapping[str, np.ndarray], path: Any) -> None:
  """Parameters must be floating point; anything else (ints, strings, raw bytes) is a ValueError."""
  bad = {k: v.dtype for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating)}
  if bad:
    listed = ', '.join(f'{k} ({d})' for k, d in sorted(bad.items())[:5])
    raise ValueError(f'{path}: {len(bad)} parameter array(s) are not floating point: {listed}'
                     f'{", ..." if len(bad) > 5 else ""}. Save parameters as float32 (bfloat16 '
                     f'as float32: .npz has no bfloat16)')


def strip_prefix(flat: Mapping[str, np.ndarray]) -> tuple[Flat, str]:
  """Removes a known training-state prefix ('opt/target/', 'params/', 'params/img/').

  Returns (flat without the prefix, the prefix or ''). With a prefix, keys outside it (optimizer
  state, the text tower) are dropped.
  """
  for prefix in _PREFIXES:
    if any(f'{prefix}{stem}' in flat for stem in _STEMS):
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, prefix
  return dict(flat), ''


def detect_layout(flat: Mapping[str, np.ndarray], prefix: str = '') -> str:
  """'vit_jax' or 'big_vision' for a prefix-free flat dict (see the module docstring)."""
  keys = set(flat)
  if any(k.startswith('Transformer/encoderblock/') for k in keys):
    return 'big_vision'  # Scanned blocks exist only in big_vision checkpoints.
  if any('/MultiHeadDotProductAttention_1/' in k for k in keys if k.startswith('Transformer/')):
    return 'vit_jax'
  if any('/MultiHeadDotProductAttention_0/' in k for k in keys if k.startswith('Transformer/')):
    return 'big_vision'
  if 'pos_embedding' in keys or prefix.startswith('params/'):
    return 'big_vision'
  if not any(stem in keys for stem in _STEMS):
    raise ValueError(f'not a Google ViT, hybrid or Mixer checkpoint: none of {_STEMS} (keys: '
                     f'{sorted(keys)[:8]}{"..." if len(keys) > 8 else ""})')
  return 'vit_jax'


def from_big_vision(flat: Mapping[str, np.ndarray]) -> tuple[Flat, list[str]]:
  """big_vision names and conventions -> this project's flat layout. Returns (flat, notes)."""
  src = dict(flat)
  out: Flat = {}
  notes: list[str] = []
  # ViT-G era checkpoints had the MAP head's modules at the top level.
  if 'probe' in src:
    for k in [k for k in src if k.split('/')[0] in _MAP_MODULES]:
      out[f'MAPHead_0/{k}'] = src.pop(k)
    notes.append('moved top-level MAP-head modules under MAPHead_0')
  pe = None
  # Today's top-level name, then the two older homes that fix_old_checkpoints also accepts.
  for key in ('pos_embedding', 'Transformer/pos_embedding',
              'Transformer/posembed_input/pos_embedding'):
    if key in src:
      pe = src.pop(key)
      break
  for key, value in src.items():
    if m := _BLOCK_KEY.match(key):
      i, module, rest = m.groups()
      out[f'Transformer/encoderblock_{i}/{_BV_BLOCK.get(module, module)}/{rest}'] = value
    elif m := _SCANNED_KEY.match(key):
      module, rest = m.groups()
      for i, layer in enumerate(value):  # The leading axis is depth.
        out[f'Transformer/encoderblock_{i}/{_BV_BLOCK.get(module, module)}/{rest}'] = layer
    else:
      out[key] = value
  if any(_SCANNED_KEY.match(k) for k in src):
    notes.append('unstacked the scanned `encoderblock` into encoderblock_{i}')
  if pe is not None:
    if 'cls' in out:
      n = pe.shape[1]
      if n > 1 and math.isqrt(n - 1) ** 2 + 1 == n:
        # An old combined checkpoint: the class-token row is already there (our layout).
        notes.append('pos_embedding already holds a class-token row (old big_vision layout)')
      else:
        # big_vision adds posemb before prepending the class token: the class token gets none.
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
        notes.append('added a zero class-token row to pos_embedding (big_vision adds it before the '
                     'class token is prepended)')
    out['Transformer/posembed_input/pos_embedding'] = pe
  return out, notes


def to_big_vision_names(flat: Mapping[str, np.ndarray]) -> Flat:
  """This project's flat layout -> big_vision's unscanned names (without `params/`), for tests.

  The class-token row of the position embedding must be zero to be expressible; it is dropped.
  """
  inverse = {v: k for k, v in _BV_BLOCK.items()}
  out: Flat = {}
  for key, value in flat.items():
    if m := _BLOCK_KEY.match(key):
      i, module, rest = m.groups()
      out[f'Transformer/encoderblock_{i}/{inverse.get(module, module)}/{rest}'] = value
    elif key == 'Transformer/posembed_input/pos_embedding':
      if 'cls' in flat:
        if np.any(value[:, 0] != 0):
          raise ValueError('big_vision has no position embedding for the class token, but row 0 '
                           'of pos_embedding is not zero')
        value = value[:, 1:]
      out['pos_embedding'] = value
    else:
      out[key] = value
  return out


def read_npz(path: str | os.PathLike) -> tuple[Flat, dict[str, Any]]:
  """Reads a Google ViT `.npz` in either layout into this project's flat layout.

  Returns (flat params, info) with info = {'format': 'npz', 'layout': 'vit_jax' | 'big_vision',
  'prefix': str, 'notes': [str]}.
  """
  flat, prefix = strip_prefix(load_npz(path))
  check_dtypes(flat, path)
  layout = detect_layout(flat, prefix)
  notes: list[str] = [f'stripped prefix {prefix!r}'] if prefix else []
  if layout == 'big_vision':
    flat, more = from_big_vision(flat)
    notes += more
  return flat, {'format': 'npz', 'layout': layout, 'prefix': prefix, 'notes': notes}


def write_npz(path: str | os.PathLike, flat: Mapping[str, Any], *, dtype: Any = np.float32) -> None:
  """Writes a flat dict in Google's vit_jax layout (no pickle; bfloat16 and others cast to `dtype`).

  The result loads in google-research/vision_transformer, in timm (`model.load_pretrained`) and
  here (`read_npz`). Which keys a family allows is its interop's `npz_keys_ok`.
  """
  arrays = {k: np.asarray(v, dtype=dtype) for k, v in flat.items()}
  with open(path, 'wb') as f:
    np.savez(f, **arrays)

