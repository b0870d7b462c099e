"""Defensive readers of the files timm and Hugging Face directories hold: JSON configs and
`.safetensors` weights. A damaged file is a ValueError naming it and what is wrong, never a bare
library error; a safetensors header is checked in Python before a byte of data is used.

safetensors layout: 8 bytes little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets:
[a, b]}, and `__metadata__`}, then the data; tensor bytes [a, b) count from the header's end.
The format carries no checksum: a flipped bit inside tensor data cannot be detected here.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

Flat = dict[str, np.ndarray]
ITEMSIZE = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2,
            'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _bad(path: Any, what: str) -> ValueError:
  return ValueError(f'{path}: not a valid .safetensors file: {what}. The file is truncated or '
                    f'corrupted; copy or download it again')


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
  """The header's tensor entries {name: {dtype, shape, data_offsets}}, every one checked against the
  file's size; raises ValueError naming the file and the problem."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise _bad(path, f'{size} bytes, shorter than the 8-byte header length')
    (n,) = struct.unpack('<Q', head)
    if n > min(size - 8, _MAX_HEADER):
      raise _bad(path, f'the header claims {n:,} bytes, but the file has {size - 8:,} after the '
                 f'length field')
    raw = f.read(n)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _bad(path, f'the header is not JSON ({e})') from e
  if not isinstance(header, dict):
    raise _bad(path, f'the header is a JSON {type(header).__name__}, not an object')
  header.pop('__metadata__', None)
  data_size = size - 8 - n
  for name, entry in header.items():
    try:
      dtype, shape, (a, b) = entry['dtype'], list(entry['shape']), entry['data_offsets']
      ok = (dtype in ITEMSIZE and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(a, int) and isinstance(b, int))
    except (TypeError, KeyError, ValueError):
      ok = False
    if not ok:
      raise _bad(path, f'tensor {name!r} has a malformed entry {entry!r}')
    if not 0 <= a <= b <= data_size:
      raise _bad(path, f'tensor {name!r} claims bytes [{a:,}, {b:,}) of data, but the file holds '
                 f'{data_size:,} bytes of data')
    if b - a != math.prod(shape) * ITEMSIZE[dtype]:
      need = math.prod(shape) * ITEMSIZE[dtype]
      raise _bad(path, f'tensor {name!r} ({dtype} {shape}) needs {need:,} bytes, its offsets span '
                 f'{b - a:,}')
  return header


def safetensors_keys(path: str | os.PathLike) -> list[str]:
  """The tensor names of a checked file."""
  return list(safetensors_header(path))


def load_safetensors(path: str | os.PathLike) -> Flat:
  """Every tensor of a checked file as a numpy array (BF16 as ml_dtypes' bfloat16)."""
  safetensors_header(path)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(os.fspath(path))
  except Exception as e:  # pylint: disable=broad-except  # what the checks above cannot see
    raise _bad(path, f'{type(e).__name__}: {e}') from e


def read_json(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON object from `path`; anything else is a ValueError naming the file."""
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore or rewrite it') from e
  if not isinstance(out, dict):
    raise ValueError(f'{path} holds a JSON {type(out).__name__}, not an object')
  return out


_PAIRS = ('img_size', 'image_size', 'patch_size', 'window_size')  # an int means (n, n)


def _canon(key: str, value: Any) -> Any:
  if value is None:
    return 0  # a headless model: num_classes None or 0
  if isinstance(value, (list, tuple)):
    return [_canon('', v) for v in value]
  if key in _PAIRS and isinstance(value, int):
    return [value, value]
  return value


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def check_declared(config_path: str, declared: Mapping[str, Any], implied: Mapping[str, Any],
                   keys: Sequence[str]) -> None:
  """Refuses a config whose `keys` disagree with what the weights imply (`implied`: the config this
  project would write for them), naming the file, the key and both values."""
  for key in keys:
    if key in declared and key in implied:
      a, b = _canon(key, declared[key]), _canon(key, implied[key])
      if not _same(a, b):
        raise ValueError(f'{config_path} says {key}={declared[key]!r}, but the weights next to it '
                         f'have {key}={implied[key]!r}: the config belongs to other weights; fix '
                         f'it or use the weights it was saved with')
